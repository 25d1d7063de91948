"""What each dashboard page shows, read through the backend Protocols only
(``Ledger.list_runs``, ``get_run``, ``list_tasks``, ``get_task``, the schedule
store), the calls ``fanout runs/status/logs/failed/cost`` make: the pages work
alike on the local and the AWS backends.

The runs page reads run records only (never a run's tasks); a run's page reads
its tasks once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fanout import coordinator
from fanout.backends.base import (
    TERMINAL_RUN_STATES,
    Backend,
    RunRecord,
    RunState,
    TaskKey,
    TaskRecord,
    TaskState,
)
from fanout.cli_observe import chunk_events, progress
from fanout.controls import chunks_ran
from fanout.errors import UserError
from fanout.limits import RunKind, kind_of
from fanout.ui.timeline import Bar, Throughput, Timeline, lay_out, throughput

#: Runs per page of the runs list.
PER_PAGE = 50
#: The most runs the runs page reads to find one page of a job filter.
SCAN_LIMIT = 100_000
#: Children of one chunk listed in the chunk tree (dead branches first).
TREE_CHILDREN = 50
#: Slices of one chunk read for its page.
MAX_SLICES = 1000


class NotFound(UserError):
    """A page of something the run does not have (a chunk, a failure group)."""


def duration(seconds: float | None) -> str:
    """``0.42s``, ``3m05s``, ``2h01m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _elapsed(run: RunRecord, now: float) -> float:
    return max(0.0, (run.finished_at or now) - run.created_at)


# -- the runs page -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRow:
    """One line of the runs page."""

    run: RunRecord
    finished: int
    fraction: float
    rate: float
    elapsed: float
    shown_state: str = ""


@dataclass(frozen=True, slots=True)
class RunsPage:
    """One page of runs, newest first."""

    rows: list[RunRow]
    first: bool  # the newest runs (no cursor)
    next_cursor: str | None  # where the next (older) page starts; None: the last page
    state: str | None
    job: str | None
    live: bool  # a run on the page is still going


def parse_state(text: str | None) -> RunState | None:
    """A ``state`` filter from a query string; :class:`UserError` if unknown."""
    if not text:
        return None
    try:
        return RunState(text)
    except ValueError:
        names = ", ".join(s.value for s in RunState)
        raise UserError(f"unknown state {text!r} (one of {names})") from None


def cursor(run: RunRecord) -> str:
    """Where the page after ``run`` starts: ``<created_at>~<run_id>``."""
    return f"{run.created_at!r}~{run.run_id}"


def parse_cursor(text: str | None) -> tuple[float, str] | None:
    """A ``before`` cursor from a query string; :class:`UserError` if malformed."""
    if not text:
        return None
    at, sep, run_id = text.partition("~")
    try:
        when = float(at)
        # A time: not NaN (every comparison false, an empty page) nor infinite.
        if not sep or not run_id or not math.isfinite(when):
            raise ValueError(text)
        return when, run_id
    except ValueError:
        raise UserError(f"bad page cursor {text!r}") from None


def _older(
    backend: Backend,
    limit: int,
    before: tuple[float, str] | None,
    states: tuple[RunState, ...] | None,
    job: str | None,
) -> list[RunRecord]:
    """Up to ``limit`` runs older than ``before``: a keyset query on the local
    ledger; elsewhere ``list_runs`` (newest first) read further and further,
    doubling, until the page is complete or the runs run out."""
    from fanout.backends.local.ledger import SQLiteLedger

    if isinstance(backend.ledger, SQLiteLedger):
        from fanout.backends.local.runs_page import runs_before

        return runs_before(backend.ledger, limit, before, states, job)
    fetch = limit
    while True:
        runs = backend.ledger.list_runs(limit=fetch, states=states)
        matching = [
            r
            for r in runs
            if (job is None or r.job_name == job)
            and (before is None or (r.created_at, r.run_id) < before)
        ]
        if len(matching) >= limit or len(runs) < fetch or fetch >= SCAN_LIMIT:
            return matching[:limit]
        fetch = min(SCAN_LIMIT, fetch * 2)


def runs_page(
    backend: Backend,
    before: tuple[float, str] | None = None,
    state: RunState | None = None,
    job: str | None = None,
    per_page: int = PER_PAGE,
    now: float | None = None,
) -> RunsPage:
    """The ``per_page`` newest runs older than ``before`` (a cursor of the page
    before; None: the newest), optionally of one state and one job. Reads run
    records only, never a run's tasks."""
    now = time.time() if now is None else now
    runs = _older(backend, per_page + 1, before, (state,) if state else None, job)
    chosen = runs[:per_page]
    rows = []
    for r in chosen:
        # As `fanout runs`/`status` show it: paused/cancelling/stopping, the
        # pauses left out of elapsed and rate, the chunks that ran.
        st, shown = coordinator.live_status(backend, r)
        finished = chunks_ran(r)
        elapsed = st.elapsed
        rows.append(
            RunRow(
                r,
                finished,
                finished / r.tasks_total if r.tasks_total else 0.0,
                r.records / elapsed if elapsed > 0 else 0.0,
                elapsed,
                shown,
            )
        )
    return RunsPage(
        rows,
        before is None,
        cursor(chosen[-1]) if len(runs) > per_page else None,
        state.value if state else None,
        job,
        any(r.state not in TERMINAL_RUN_STATES for r in chosen),
    )


# -- a run's page ------------------------------------------------------------------


@dataclass
class TreeNode:
    """A chunk in the chunk tree: its last slice's state and its subtree's figures."""

    chunk_id: str
    state: str
    records: int = 0
    slices: int = 0
    subtree_chunks: int = 1
    dead_below: int = 0  # dead chunks in this subtree, itself included
    children: list[TreeNode] = field(default_factory=list)
    hidden_children: int = 0  # children past TREE_CHILDREN, not listed


def chunk_tree(tasks: Sequence[TaskRecord]) -> list[TreeNode]:
    """The chunk lineage (``0`` → ``0/3`` → ``0/3/1``); dead branches first,
    at most :data:`TREE_CHILDREN` children listed per chunk."""
    nodes: dict[str, TreeNode] = {}
    for t in tasks:  # ordered by chunk id and seq: the last slice wins
        node = nodes.get(t.chunk_id)
        if node is None:
            node = nodes[t.chunk_id] = TreeNode(t.chunk_id, t.state.value)
        node.state = t.state.value
        node.slices += 1
        node.records += t.output.records if t.output else 0
    roots: list[TreeNode] = []
    # Deepest first, so each node's subtree is complete before its parent's.
    for chunk_id in sorted(nodes, key=lambda c: -c.count("/")):
        node = nodes[chunk_id]
        if node.state == TaskState.DEAD.value:
            node.dead_below += 1
        parent = nodes.get(chunk_id.rpartition("/")[0]) if "/" in chunk_id else None
        if parent is None:
            roots.append(node)
            continue
        parent.children.append(node)
        parent.subtree_chunks += node.subtree_chunks
        parent.dead_below += node.dead_below
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.dead_below == 0, _chunk_key(n.chunk_id)))
        node.hidden_children = max(0, len(node.children) - TREE_CHILDREN)
        del node.children[TREE_CHILDREN:]
    roots.sort(key=lambda n: _chunk_key(n.chunk_id))
    return roots


def _chunk_key(chunk_id: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in chunk_id.split("/"))


@dataclass(frozen=True, slots=True)
class Crawl:
    """A crawl run's figures (from the run's summed stats)."""

    totals: dict[str, int]
    pages_per_s: float
    statuses: dict[str, int]
    domains: list[tuple[str, int, dict[str, int], int]]  # name, pages, statuses, throttled


def crawl_figures(run: RunRecord, elapsed: float) -> Crawl | None:
    """Pages/s, HTTP statuses and per-domain figures; None for a run that is no crawl."""
    if kind_of(run.settings) is not RunKind.CRAWL:
        return None  # a job's own counters may be named "pages" too
    stats = dict(run.stats)
    domains: dict[str, dict[str, int]] = {}
    for key in [k for k in stats if k.startswith("domain/")]:
        name, _, what = key[len("domain/") :].partition("/")
        domains.setdefault(name, {})[what] = stats.pop(key)
    statuses = {k[len("status/") :]: stats.pop(k) for k in sorted(stats) if k.startswith("status/")}
    rows = [
        (
            name,
            figures.get("pages", 0),
            {k[len("status/") :]: v for k, v in sorted(figures.items()) if "/" in k},
            figures.get("throttled", 0),
        )
        for name, figures in domains.items()
    ]
    rows.sort(key=lambda d: (-d[1], d[0]))
    pages = stats.get("pages", 0)
    return Crawl(stats, pages / elapsed if elapsed > 0 else 0.0, statuses, rows)


@dataclass(frozen=True, slots=True)
class RunView:
    """Everything a run's page (and its report) shows."""

    run: RunRecord
    progress: dict[str, Any]
    counts: dict[str, int]
    timeline: Timeline
    throughput: Throughput
    tree: list[TreeNode]
    crawl: Crawl | None
    dead: int
    built_at: float
    tasks: list[TaskRecord]  # for the cost estimate, computed only for a whole page


def run_cost(view: RunView) -> dict[str, Any]:
    """The ``fanout cost`` estimate of the run (not part of the live updates:
    it costs as much as the rest of the view)."""
    from fanout import cost as costs

    return costs.estimate(view.run, view.tasks)


def run_view(backend: Backend, run_id: str, now: float | None = None) -> RunView:
    """A run's page: one read of the run and one of its tasks."""
    from fanout.ui.timeline import attempts

    now = time.time() if now is None else now
    run = coordinator.get_run(backend, run_id)
    tasks = backend.ledger.list_tasks(run_id)
    counts = {s.value: 0 for s in TaskState}
    for t in tasks:
        counts[t.state.value] += 1
    bars, unmeasured = attempts(tasks, now)
    placed, lanes = lay_out(bars)
    start = min((b.start for b in placed), default=run.created_at)
    end = max((b.end for b in placed), default=start)
    tl = Timeline(placed, lanes, start, end, unmeasured)
    st, shown = coordinator.live_status(backend, run, counts)
    return RunView(
        run=run,
        progress=progress(st, shown),
        counts=counts,
        timeline=tl,
        throughput=throughput(placed),
        tree=chunk_tree(tasks),
        crawl=crawl_figures(run, st.elapsed),
        dead=counts[TaskState.DEAD.value],
        built_at=now,
        tasks=tasks,
    )


# -- a chunk's page ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slice:
    """One task (slice) of a chunk, with where it started from."""

    task: TaskRecord
    cursor: str | None  # the checkpoint it starts from, as JSON (None: the chunk's start)


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A chunk's page: its slices, their attempts and its log events."""

    run: RunRecord
    chunk_id: str
    slices: list[Slice]
    events: list[dict[str, Any]]
    bars: list[Bar]
    hidden: int = 0  # earlier slices not read (past MAX_SLICES)


def _last_seq(backend: Backend, run_id: str, chunk_id: str) -> int:
    """The chunk's last seq (slices are numbered 0..n-1 without gaps), found
    with O(log n) ``get_task`` reads; -1 if the chunk has none."""

    def has(seq: int) -> bool:
        return backend.ledger.get_task(TaskKey(run_id, chunk_id, seq)) is not None

    if not has(0):
        return -1
    lo, hi = 0, 1
    while has(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # has(lo), not has(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if has(mid) else (lo, mid)
    return lo


def chunk_view(backend: Backend, run_id: str, chunk_id: str) -> ChunkView:
    """Every slice of ``chunk_id`` (``get_task`` by seq, so the run's other
    tasks are not read); :class:`UserError` if the run has no such chunk."""
    from fanout.ui.timeline import attempts

    run = coordinator.get_run(backend, run_id)
    last = _last_seq(backend, run_id, chunk_id)
    # The last slices, not the first: the latest (running, dead) one is the one that matters.
    first = max(0, last - MAX_SLICES + 1)
    tasks: list[TaskRecord] = []
    for seq in range(first, last + 1):
        task = backend.ledger.get_task(TaskKey(run_id, chunk_id, seq))
        if task is None:
            break
        tasks.append(task)
    if not tasks:
        raise NotFound(f"run {run_id} has no chunk {chunk_id!r}")
    slices = []
    for t in tasks:
        cursor = coordinator.checkpoint(backend, t)
        slices.append(Slice(t, None if cursor is None else json.dumps(cursor)))
    bars, _ = attempts(tasks)
    return ChunkView(run, chunk_id, slices, chunk_events(tasks), bars, hidden=first)


# -- failures ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Dead chunks whose errors differ only in their numbers."""

    key: str  # a short hash of the pattern: what the group's Replay button names
    pattern: str
    example: str
    tasks: list[TaskRecord]


def error_pattern(error: str | None) -> str:
    """An error's first line with its numbers masked (``row 17`` and ``row 42``
    are one group)."""
    first = (error or "(no error recorded)").splitlines()[0] if error else "(no error recorded)"
    return re.sub(r"\d+", "#", first)


def group_key(pattern: str) -> str:
    """A short, stable name for a failure group (for forms and URLs)."""
    return hashlib.sha256(pattern.encode()).hexdigest()[:16]


def failure_groups(backend: Backend, run_id: str) -> tuple[RunRecord, list[FailureGroup]]:
    """The run's dead chunks grouped by error, biggest group first."""
    run = coordinator.get_run(backend, run_id)
    groups: dict[str, list[TaskRecord]] = {}
    for t in backend.ledger.list_tasks(run_id, (TaskState.DEAD,)):
        groups.setdefault(error_pattern(t.error), []).append(t)
    ordered = sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))
    return run, [FailureGroup(group_key(p), p, tasks[0].error or "", tasks) for p, tasks in ordered]


def group_chunks(backend: Backend, run_id: str, key: str) -> list[str]:
    """The chunk ids of failure group ``key``; :class:`UserError` if there is none
    (the group was replayed meanwhile, or the key is wrong)."""
    for group in failure_groups(backend, run_id)[1]:
        if group.key == key:
            return [t.chunk_id for t in group.tasks]
    raise NotFound(f"run {run_id} has no failure group {key!r} (replayed already?)")


# -- schedules ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A schedule with its next fire times and the last runs it started."""

    name: str
    expression: str
    job: str
    overlap: str
    catch_up: str
    next_fires: list[str]
    last_runs: list[tuple[str, str, str]]  # tick, run id, state


#: Ticks looked back over for a schedule's last runs.
TICKS_BACK = 20


def schedules_view(backend: Backend, last: int = 5) -> list[ScheduleRow]:
    """Every schedule of the backend's store. A tick's run id is deterministic
    (``<name>-<yyyymmddThhmm>``), so the last runs are read by id, tick by
    tick back from now: no scan of the runs."""
    from fanout.schedules import open_store
    from fanout.schedules.model import iso, now_utc, run_id_for

    store = open_store(backend)
    try:
        entries = store.list()
    finally:
        store.close()
    now = now_utc()
    rows = []
    for s in entries:
        first = s.next_fire(now)
        fires = [first, *s.spec.fires(first, 4)] if first is not None else []
        runs: list[tuple[str, str, str]] = []
        tick = s.spec.latest_at_or_before(now)
        for _ in range(TICKS_BACK):
            if tick is None or tick < s.start or len(runs) >= last:
                break
            run = backend.ledger.get_run(run_id_for(s.name, tick))
            if run is not None:
                runs.append((iso(tick), run.run_id, run.state.value))
            tick = s.spec.latest_at_or_before(tick - timedelta(seconds=1))
        rows.append(
            ScheduleRow(
                s.name, s.expression, s.job, s.overlap, s.catch_up, [iso(f) for f in fires], runs
            )
        )
    return rows
