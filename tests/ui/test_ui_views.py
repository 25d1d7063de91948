"""What the pages compute: lanes of the timeline, throughput buckets, the
chunk tree, failure groups, and the run views' refresh (no page polls the
ledger's tasks more than once per interval)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Failed

from fanout.backends.base import Backend, TaskRecord, TaskState
from fanout.ui import views
from fanout.ui.timeline import Bar, lay_out, throughput


def bar(start: float, end: float, outcome: str = "committed", records: int = 0) -> Bar:
    return Bar("0/1", 0, 1, start, end, outcome, records)


def test_each_attempt_takes_the_lowest_lane_free_at_its_start() -> None:
    placed, lanes = lay_out([bar(0, 4), bar(1, 2), bar(1.999, 3), bar(3.5, 5), bar(1.5, 6)])
    by_start = {b.start: b.lane for b in placed}
    assert lanes == 3
    # 1-2 and then 1.999-3 share lane 1: a start 1 ms early is the ledger's
    # rounding (times and durations to the millisecond), not a second worker.
    assert by_start == {0: 0, 1: 1, 1.5: 2, 1.999: 1, 3.5: 1}
    assert lay_out([bar(0, 1), bar(0.99, 2)])[1] == 2  # a real overlap: two lanes


def test_throughput_buckets_count_records_and_chunks_where_they_ended() -> None:
    bars = [bar(0, 1, records=10), bar(0, 8, records=30), bar(1, 2, "dead")] + [
        bar(i, i + 0.5, records=1) for i in range(2, 8)
    ]
    tp = throughput(bars, buckets=60)
    assert len(tp.records_per_s) == 2  # 8 finished attempts: about four a bucket
    assert tp.width == 4.0
    assert tp.records_per_s == [(10 + 1 + 1) / 4, (30 + 4) / 4]
    assert tp.chunks_per_s == [3 / 4, 5 / 4]
    assert throughput([bar(0, 1, "dead")]).records_per_s == []


def task(chunk_id: str, state: TaskState, seq: int = 0) -> TaskRecord:
    return TaskRecord("r", chunk_id, seq, state, 1, 0, chunk_id.count("/"), "{}")


def test_chunk_tree_lists_dead_branches_first_and_caps_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(views, "TREE_CHILDREN", 3)
    tasks = [task("0", TaskState.DONE)]
    tasks += [task(f"0/{i}", TaskState.DONE) for i in range(6)]
    tasks += [task("0/5/0", TaskState.DEAD), task("0/4", TaskState.DONE, seq=1)]
    (root,) = views.chunk_tree(tasks)
    assert root.subtree_chunks == 8 and root.dead_below == 1
    assert [c.chunk_id for c in root.children] == ["0/5", "0/0", "0/1"]
    assert root.hidden_children == 3
    assert root.children[0].dead_below == 1 and root.children[0].children[0].state == "dead"


def test_errors_that_differ_in_numbers_are_one_group() -> None:
    assert views.error_pattern("error: row 17 of 200\nTraceback") == "error: row # of #"
    assert views.error_pattern(None) == "(no error recorded)"
    assert views.group_key("a") != views.group_key("b")


def test_open_pages_read_a_runs_tasks_once_per_refresh(
    failed: Failed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fanout.ui import app

    cache = app.RunViews(failed.backend)
    first = cache.get(failed.run_id)
    for _ in range(5):
        assert cache.get(failed.run_id) is not None
    assert cache.builds == 1  # the run did not change
    failed.flag.unlink()
    from fanout import coordinator

    coordinator.replay(failed.backend, failed.run_id)
    monkeypatch.setattr(app, "MIN_REFRESH", 3600.0)
    monkeypatch.setattr(app, "MAX_REFRESH", 3600.0)
    seen = cache.get(failed.run_id)
    assert cache.builds == 1  # changed, but built less than an interval ago
    assert seen.run.state.value == "running"  # the counters are read fresh
    assert seen.counts == first.counts  # the tasks are not
    monkeypatch.setattr(app, "MIN_REFRESH", 0.0)
    monkeypatch.setattr(app, "MAX_REFRESH", 0.0)
    assert cache.get(failed.run_id).counts["queued"] == 2
    assert cache.builds == 2


def test_a_crawl_runs_page_shows_pages_per_second_statuses_and_domains(
    local_backend: Backend, make_client: Any
) -> None:
    from fanout.backends.base import NewTask, RunRecord

    crawl = {"kind": "crawl"}  # as a CrawlJob's run records it
    run = RunRecord("crawl-1", "c.py", "crawl", {}, crawl, created_at=1000.0)
    local_backend.ledger.create_run(run, NewTask("0", 0, 0, "{}"))
    stats = {
        "pages": 300,
        "duplicates": 12,
        "status/200": 290,
        "status/404": 10,
        "domain/a.example/pages": 200,
        "domain/a.example/status/200": 200,
        "domain/<b>.example/pages": 100,
        "domain/<b>.example/status/404": 10,
        "domain/<b>.example/throttled": 3,
    }
    figures = views.crawl_figures(RunRecord("r", "j", "j", {}, crawl, stats=stats), 60.0)
    assert figures is not None
    assert figures.pages_per_s == 5.0
    assert figures.statuses == {"200": 290, "404": 10}
    assert figures.domains[0] == ("a.example", 200, {"200": 200}, 0)
    assert figures.domains[1] == ("<b>.example", 100, {"404": 10}, 3)
    assert views.crawl_figures(RunRecord("r", "j", "j", {}, {}, stats=stats), 1.0) is None  # ETL
    db = local_backend.ledger.db  # type: ignore[attr-defined]
    with db.write() as conn:
        conn.execute("UPDATE runs SET stats = ? WHERE run_id = 'crawl-1'", (json.dumps(stats),))
    body = make_client(local_backend).get("/runs/crawl-1").text
    assert "pages/s" in body and "&lt;b&gt;.example" in body and "<b>.example" not in body


def test_only_the_latest_run_views_are_kept(
    failed: Failed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fanout.backends.base import NewTask, RunRecord
    from fanout.ui import app

    other = RunRecord("other-run", "x.py", "x", {}, {}, created_at=1.0)
    failed.backend.ledger.create_run(other, NewTask("0", 0, 0, "{}"))
    monkeypatch.setattr(app, "MAX_CACHED", 1)
    cache = app.RunViews(failed.backend)
    cache.get(failed.run_id)
    cache.get(failed.run_id)
    assert cache.builds == 1
    cache.get("other-run")  # pushes the first out
    cache.get(failed.run_id)
    assert cache.builds == 3


def test_a_paused_runs_page_says_paused_built_or_cached(local_backend: Backend) -> None:
    """The run page showed a paused run as "running", with an ETA: pausing
    changes the run's controls, not its record, and the page did not read them."""
    from fanout import control_ops, coordinator
    from fanout.dispatch import Dispatcher
    from fanout.ui import app
    from support.helpers import JOBS

    backend = local_backend
    run_id = coordinator.submit(backend, str(JOBS / "controlled.py"), {"chunks": 4}).run_id
    dispatcher = Dispatcher(backend)
    for _ in range(2):  # the plan, then one chunk: progress, so an ETA would show
        (delivery,) = backend.queue.receive(1, 30)
        dispatcher.handle(delivery, 10.0)
    cache = app.RunViews(backend)
    assert cache.get(run_id).progress["state"] == "running"
    assert control_ops.pause(backend, run_id).changed
    assert views.run_view(backend, run_id).progress["state"] == "paused"
    cached = cache.get(run_id)  # the run record did not change: the cached view
    assert cache.builds == 1
    assert (cached.progress["state"], cached.progress["eta_s"]) == ("paused", None)


def test_the_runs_page_shows_a_paused_run_as_paused_and_a_cancelled_one_not_complete(
    local_backend: Backend,
) -> None:
    # The runs page printed the record's state ("running" for a paused run) and
    # counted cancelled chunks as done: a cancelled run showed 52/52 (a
    # black-box helper's find; `fanout runs` and the run page said otherwise).
    from fanout import control_ops, coordinator
    from fanout.dispatch import Dispatcher
    from support.helpers import JOBS

    backend = local_backend
    job = str(JOBS / "controlled.py")
    paused = coordinator.submit(backend, job, {"chunks": 4}).run_id
    dispatcher = Dispatcher(backend)
    (plan,) = backend.queue.receive(1, 30)
    dispatcher.handle(plan, 10.0)
    assert control_ops.pause(backend, paused).changed
    row = next(r for r in views.runs_page(backend).rows if r.run.run_id == paused)
    assert row.shown_state == "paused"

    control_ops.cancel(backend, paused)
    row = next(r for r in views.runs_page(backend).rows if r.run.run_id == paused)
    run = row.run
    assert run.state.value == "cancelled" and run.tasks_cancelled == 4, run
    assert row.finished == 1 and row.fraction < 1.0  # the plan ran; 4 cancelled did not


def test_a_chunks_page_shows_its_last_slices_and_says_how_many_it_leaves_out(
    local_backend: Backend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # It showed the first MAX_SLICES slices: a chunk's dead last slice (its
    # error, its Replay button) was not on its page, and nothing said so.
    from fanout import coordinator
    from support.helpers import drain

    job = tmp_path / "slices.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('slices', schema={'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 's', 'type': 'long'}]})\n"
        "@job.process\ndef process(payload, ctx):\n"
        "    s = ctx.cursor or 0\n    ctx.emit({'s': s})\n"
        "    return ctx.resume_at(s + 1) if s < 4 else None\n"
    )
    monkeypatch.setattr(views, "MAX_SLICES", 3)
    run_id = coordinator.submit(local_backend, str(job)).run_id
    assert drain(local_backend, run_id).records == 5
    view = views.chunk_view(local_backend, run_id, "0")
    assert [s.task.seq for s in view.slices] == [2, 3, 4] and view.hidden == 2
