"""Partitioned output, the table catalog, compaction and gc (``fanout.tables``).

The runs go through the real engine (submit, then the runner works the queue)
on the local backend and on moto; the crash tests run ``fanout`` as a process
that SIGKILLs itself between two steps (``tests/support/kill_at.py``). Files are read
back with the Apache ``avro`` package, not with fastavro that wrote them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import avro.datafile
import avro.io
import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunRecord, Store, TaskState
from fanout.dispatch import Dispatcher
from fanout.tables.catalog import read_catalog
from support.helpers import add_from_another_thread

TESTS = Path(__file__).parent
ROOT = TESTS.parent
JOB = str(TESTS / "testjobs" / "readings_table.py")


# -- helpers -------------------------------------------------------------------------


def handler(backend: Backend) -> Dispatcher:
    """The engine's delivery handler: the one place the table tests name it."""
    return Dispatcher(backend)


def deliver(backend: Backend, count: int) -> None:
    """Hand the next ``count`` deliveries, one at a time, to the engine here."""
    engine = handler(backend)
    for _ in range(count):
        (delivery,) = backend.queue.receive(1, 15.0)
        engine.handle(delivery, 10.0)


def drain(backend: Backend, run_id: str, limit: float = 60.0) -> RunRecord:
    """Work the queue in this process until the run finishes."""
    engine = handler(backend)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for delivery in backend.queue.receive(10, 15.0):
            engine.handle(delivery, 10.0)
        run = backend.ledger.get_run(run_id)
        assert run is not None
        if run.state in TERMINAL_RUN_STATES:
            return run
    raise AssertionError(f"run {run_id} did not finish in {limit}s")


def run_job(backend: Backend, **params: Any) -> RunRecord:
    record = coordinator.submit(backend, JOB, params)
    return drain(backend, record.run_id)


def avro_items(data: bytes) -> list[str]:
    """The ``item`` of every record of one Avro file, read by Apache avro."""
    reader = avro.datafile.DataFileReader(io.BytesIO(data), avro.io.DatumReader())
    try:
        return [record["item"] for record in reader]
    finally:
        reader.close()


def table_items(store: Store, table: str = "readings") -> Counter[str]:
    """How often each item is in the table: its catalog's live files, read with avro."""
    catalog = read_catalog(store, table)
    assert catalog is not None
    counts: Counter[str] = Counter()
    for f in catalog.files:
        items = avro_items(store.get(f["key"]))
        assert len(items) == f["records"], f["key"]
        counts.update(items)
    return counts


def expected(tag: str, chunks: int, rows: int) -> Counter[str]:
    return Counter(f"{tag}-{i}-{r}" for i in range(chunks) for r in range(rows))


def fanout(home: Path, *args: str, script: str = "-m fanout.cli", **env: str) -> Any:
    """``fanout --home HOME ARGS`` as a process (``script``: another entry point)."""
    path = os.pathsep.join([str(ROOT), str(TESTS)])
    return subprocess.run(
        [sys.executable, *script.split(), "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path, **env},
    )


@pytest.fixture(params=["local", "aws"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The local backend, and the AWS backend on moto."""
    fixture = "ledger" if request.param == "local" else "aws"
    result: Backend = request.getfixturevalue(fixture)
    return result


# -- partitioned output ----------------------------------------------------------------


def test_three_days_land_in_three_partitions_once_and_a_second_run_adds(
    backend: Backend,
) -> None:
    first = run_job(backend, tag="a", chunks=4, rows=30, days=3, step=10)
    assert first.state == "succeeded"
    manifest = json.loads(backend.store.get(first.manifest_key or ""))
    days = ["dt=2024-01-01", "dt=2024-01-02", "dt=2024-01-03"]
    assert manifest["table"] == "readings"
    assert sorted(manifest["partitions"]) == days
    assert sum(p["records"] for p in manifest["partitions"].values()) == 120
    for f in manifest["files"]:
        assert f["key"].startswith(f"tables/readings/{f['partition']}/")
        assert f["key"].endswith(".avro")
    assert table_items(backend.store) == expected("a", 4, 30)

    second = run_job(backend, tag="b", chunks=2, rows=9, days=3)
    assert second.state == "succeeded"
    catalog = read_catalog(backend.store, "readings")
    assert catalog is not None
    assert sorted({f["partition"] for f in catalog.files}) == days
    assert set(catalog.data["runs"]) == {first.run_id, second.run_id}
    assert table_items(backend.store) == expected("a", 4, 30) + expected("b", 2, 9)


def test_a_record_without_the_partition_field_is_a_record_error_naming_it(
    ledger: Backend,
) -> None:
    run = run_job(ledger, tag="a", chunks=2, rows=5, no_time_at=3)
    assert run.state == "failed"
    dead = ledger.ledger.list_tasks(run.run_id, (TaskState.DEAD,))
    assert [t.chunk_id for t in dead] == ["0/0"]
    assert "record 3 has no field 'read_at' to partition by" in (dead[0].error or "")
    # Only the chunk that committed is in the table: chunk 1's five readings.
    assert table_items(ledger.store) == Counter(f"a-1-{r}" for r in range(5))


def test_a_record_that_does_not_fit_is_numbered_within_its_chunk(ledger: Backend) -> None:
    # Record 7 is the third of its partition (days 1, 4, 7 of chunk 0 are dt=2024-01-02).
    run = run_job(ledger, tag="a", chunks=1, rows=9, bad_kwh_at=7)
    (dead,) = ledger.ledger.list_tasks(run.run_id, (TaskState.DEAD,))
    assert "record 7 does not fit schema tests.reading: " in (dead.error or "")
    assert "kwh" in (dead.error or "") and "(partition dt=2024-01-02)" in (dead.error or "")


def test_finalizing_a_run_twice_adds_its_files_once(ledger: Backend) -> None:
    from fanout.tables.commit import join_table

    run = run_job(ledger, tag="a", chunks=3, rows=6)
    manifest = json.loads(ledger.store.get(run.manifest_key or ""))
    before = read_catalog(ledger.store, "readings")
    join_table(ledger.store, manifest)  # a finalizer that took over re-runs this step
    after = read_catalog(ledger.store, "readings")
    assert before is not None and after is not None
    assert after.version == before.version
    assert table_items(ledger.store) == expected("a", 3, 6)


def test_compact_setting_leaves_one_file_per_partition_the_run_wrote(backend: Backend) -> None:
    first = run_job(backend, tag="a", chunks=6, rows=6, days=3)
    record = coordinator.submit(
        backend, JOB, {"tag": "b", "chunks": 5, "rows": 4, "days": 2}, {"compact": True}
    )
    assert drain(backend, record.run_id).state == "succeeded"
    catalog = read_catalog(backend.store, "readings")
    assert catalog is not None
    by_partition = Counter(f["partition"] for f in catalog.files)
    # The run wrote to the first two days: each is one file now (both runs'
    # files); the third day, which only the first run wrote, is as it was.
    assert by_partition == {"dt=2024-01-01": 1, "dt=2024-01-02": 1, "dt=2024-01-03": 6}
    assert table_items(backend.store) == expected("a", 6, 6) + expected("b", 5, 4)
    assert first.state == "succeeded"
    assert catalog.data["operation"].startswith("compaction")


def test_two_writers_racing_for_the_next_catalog_version_both_land(backend: Backend) -> None:
    from fanout.tables.catalog import update_catalog

    store = backend.store
    update_catalog(store, "race", lambda snap: {**snap, "files": []}, "create")
    calls = 0

    def add(name: str) -> Any:
        def change(snap: dict[str, Any]) -> dict[str, Any]:
            snap["files"].append({"key": name, "partition": "", "records": 1, "bytes": 1})
            return snap

        return change

    def ours(snap: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:  # another process swaps version 2 in after we read version 1
            update_catalog(store, "race", add("theirs"), "theirs")
        return add("ours")(snap)

    result = update_catalog(store, "race", ours, "ours")
    assert calls == 2  # the first write of version 2 lost, the retry read theirs
    assert result.version == 3
    assert [f["key"] for f in result.files] == ["theirs", "ours"]
    catalog = read_catalog(store, "race")
    assert catalog is not None and catalog.version == 3 and len(catalog.files) == 2


# -- crashes: gc --dry-run and compaction under SIGKILL ---------------------------------


def test_gc_dry_run_lists_exactly_the_files_a_crashed_attempt_left(tmp_path: Path) -> None:
    home = tmp_path / "home"
    params = ["-p", "chunks=3", "-p", "rows=9"]
    submitted = fanout(home, "submit", JOB, *params)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip().splitlines()[-1]
    # The worker process dies right after writing chunk 0/1's parts list: its
    # three partition files and the list are on disk, the ledger commit never
    # came. The supervisor records the crash and the retry writes new files.
    worked = fanout(
        home,
        "worker",
        "-w",
        "1",
        "--until-idle",
        script=str(TESTS / "support" / "kill_at.py"),
        FANOUT_TEST_KILL_OP="put",
        FANOUT_TEST_KILL_KEY="/parts/0.1-s0-a1-",
    )
    assert worked.returncode == 0, worked.stderr
    assert "crashed" in worked.stderr
    # Quick chunks are claimed and committed in batches (fanout.batches): a
    # batch-mate that finished before the crash lost its commit too: it is
    # recorded as interrupted and retried. Every such attempt's files are left.
    # An interrupted attempt is not counted, so its retry has the same attempt
    # number: the attempt that committed is told by its token (its output key's).
    backend = open_backend("local", home=home)
    try:
        tasks = backend.ledger.list_tasks(run_id)
        uncommitted = {
            f"{t.chunk_id.replace('/', '.')}-s{t.seq}-a{e['attempt']}-"
            for t in tasks
            for e in t.history
            if e["outcome"] in ("crashed", "interrupted")
        }
        committed = {t.output.key.rsplit("-", 1)[1][:8] for t in tasks if t.output is not None}
    finally:
        backend.close()
    assert "0.1-s0-a1-" in uncommitted
    store_root = home / "store"

    def attempt_left(name: str) -> bool:
        tag = next((t for t in uncommitted if f".{t}" in name or name.startswith(t)), None)
        return tag is not None and name.split(tag, 1)[1][:8] not in committed

    left = sorted(
        str(p.relative_to(store_root))
        for p in store_root.rglob("*")
        if p.is_file() and attempt_left(p.name)
    )
    # The killed attempt's three days and parts list (a batch-mate not started
    # when the worker died wrote nothing).
    assert len([k for k in left if "0.1-s0-a1-" in k]) == 4

    dry = fanout(home, "gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert sorted(g["key"] for g in listed if g["reason"] == "uncommitted") == left
    assert {g["reason"] for g in listed} <= {"uncommitted", "payload"}
    assert all((store_root / key).exists() for key in left)  # a dry run removes nothing

    backend = open_backend("local", home=home)
    try:
        assert backend.ledger.get_run(run_id) is not None
        assert table_items(backend.store) == expected("a", 3, 9)
        removed = fanout(home, "gc")
        assert removed.returncode == 0, removed.stderr
        assert not any((store_root / key).exists() for key in left)
        assert table_items(backend.store) == expected("a", 3, 9)  # no committed file touched
    finally:
        backend.close()


def test_gc_never_touches_the_files_of_a_run_still_running(ledger: Backend) -> None:
    from fanout.tables.gc import collect

    first = run_job(ledger, tag="a", chunks=2, rows=6)  # a table to collect in
    record = coordinator.submit(ledger, JOB, {"tag": "b", "chunks": 3, "rows": 6})
    deliver(ledger, 3)  # the plan and two chunks commit; the run is not finished
    run = ledger.ledger.get_run(record.run_id)
    assert run is not None and run.state == "running"
    written = [k for k in ledger.store.list("tables/readings/dt=") if record.run_id in k]
    assert len(written) == 6  # two chunks x three days, committed but not in the table yet
    # Even with every finished run "old", only the finished run's runs/ objects go.
    removed = collect(ledger.store, ledger.ledger, older_than=0.0)
    assert removed and {g.reason for g in removed} == {"old run"}
    assert all(g.key.startswith(f"runs/{first.run_id}/") for g in removed)
    assert all(ledger.store.exists(k) for k in written)
    assert table_items(ledger.store) == expected("a", 2, 6)  # its table files stay
    assert drain(ledger, record.run_id).state == "succeeded"
    assert table_items(ledger.store) == expected("a", 2, 6) + expected("b", 3, 6)


class _FinishOnListing:
    """A store whose first listing of ``prefix`` first runs ``finish``: a run
    that joins its table and finishes while gc is at work."""

    def __init__(self, store: Store, prefix: str, finish: Any) -> None:
        self.store, self.prefix, self.finish = store, prefix, finish

    def list(self, prefix: str) -> Any:
        if prefix == self.prefix and self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return self.store.list(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_gc_keeps_the_files_of_a_run_that_finished_while_it_collected(ledger: Backend) -> None:
    # gc read the catalog, then listed the table's files, then asked whether
    # their runs had finished: a run that joined the table and finished between
    # the catalog read and the listing had every committed file deleted as an
    # attempt's leftover (a black-box helper lost 10,000 of 70,000 records with
    # a gc loop beside ordinary runs).
    from fanout.tables.gc import collect

    run_job(ledger, tag="a", chunks=2, rows=6)
    record = coordinator.submit(ledger, JOB, {"tag": "b", "chunks": 2, "rows": 6})
    deliver(ledger, 2)  # the plan and one chunk: the run is still running
    store = _FinishOnListing(ledger.store, "tables/readings/", lambda: drain(ledger, record.run_id))
    removed = collect(store, ledger.ledger)  # type: ignore[arg-type]
    assert store.finish is None  # the run did finish during the collection
    assert [g for g in removed if g.reason == "uncommitted"] == []
    assert table_items(ledger.store) == expected("a", 2, 6) + expected("b", 2, 6)


def test_a_catalog_change_is_not_lost_to_a_version_number_gc_pruned(ledger: Backend) -> None:
    # A writer read version N; before it wrote N+1, ten more changes landed and
    # gc pruned N+1. Its write-if-absent then won the freed number, below the
    # head no reader looks past: its change was lost without an error (a
    # compaction's then deleted the files it had replaced, still live).
    from fanout.tables.catalog import update_catalog, versions
    from fanout.tables.gc import KEEP_VERSIONS, collect

    run_job(ledger, tag="a", chunks=1, rows=2)
    store = ledger.store
    calls = []

    def slow_change(snap: dict[str, Any]) -> dict[str, Any]:
        calls.append(snap["version"])
        if len(calls) == 1:  # meanwhile: other changes, then a gc
            for n in range(KEEP_VERSIONS + 1):
                update_catalog(store, "readings", lambda snap: snap, f"other change {n}")
            collect(store, ledger.ledger)
            assert snap["version"] + 1 not in versions(store, "readings")  # pruned
        snap["note"] = "the slow change"
        return snap

    written = update_catalog(store, "readings", slow_change, "slow change")
    head = read_catalog(store, "readings")
    assert head is not None and head.version == written.version
    assert head.data.get("note") == "the slow change"
    assert len(calls) == 2 and calls[1] == calls[0] + KEEP_VERSIONS + 1  # made again, on the head


def test_a_compaction_that_loses_the_race_while_reading_says_so_in_one_line(
    ledger: Backend,
) -> None:
    # Two compactions a moment apart: the second read a file the first had
    # swapped out and deleted, and died with a KeyError traceback, leaving its
    # intent and files for the next compaction to "repair".
    from fanout.errors import UserError
    from fanout.tables.compact import compact

    run_job(ledger, tag="a", chunks=3, rows=6)
    store = ledger.store
    first_open = []

    class Racing:
        def open(self, key: str) -> Any:
            if not first_open:
                first_open.append(key)
                compact(store, "readings")  # the other one, start to end
            return store.open(key)

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    with pytest.raises(UserError, match="another compaction replaced these files first"):
        compact(Racing(), "readings")  # type: ignore[arg-type]
    assert first_open and not store.exists(first_open[0])
    assert list(store.list("tables/readings/_compactions/")) == []
    catalog = read_catalog(store, "readings")
    assert catalog is not None
    live = {f["key"] for f in catalog.files}
    avro = {k for k in store.list("tables/readings/") if k.endswith(".avro")}
    assert avro == live  # no file of the loser left behind
    assert table_items(store) == expected("a", 3, 6)


@pytest.mark.parametrize("meanwhile", ["ten changes and a gc", "an older fanout's change"])
def test_a_compaction_whose_own_catalog_version_looks_stale_keeps_its_files(
    ledger: Backend, meanwhile: str
) -> None:
    # The review of the stale-version check: a writer that paused after its
    # write while ten changes and a gc went by (its version and the next one
    # pruned), or whose next version an older fanout wrote (copying its id),
    # took its own version for a stale one and swapped again; the compaction
    # then found its old files gone, took that for a lost race and deleted its
    # new files, the ones the catalog read: every record of the table lost.
    from fanout.backends.keys import table_catalog_key
    from fanout.tables.catalog import update_catalog
    from fanout.tables.compact import compact
    from fanout.tables.gc import KEEP_VERSIONS, collect

    run_job(ledger, tag="a", chunks=3, rows=6)
    store = ledger.store

    def after_the_swap() -> None:
        if meanwhile == "ten changes and a gc":
            for n in range(KEEP_VERSIONS + 1):
                update_catalog(store, "readings", lambda snap: snap, f"other change {n}")
            collect(store, ledger.ledger)
        else:  # what update_catalog did before versions had an id and a parent
            head = read_catalog(store, "readings")
            assert head is not None
            data = {**head.data, "version": head.version + 1, "operation": "old fanout"}
            key = table_catalog_key("readings", head.version + 1)
            assert store.put(key, json.dumps(data).encode(), if_absent=True)

    class PauseAfterTheSwap:
        def put(self, key: str, data: Any, *, if_absent: bool = False) -> bool:
            done = store.put(key, data, if_absent=if_absent)
            if done and "/_catalog/" in key and b'"operation":"compaction' in data:
                after_the_swap()
            return done

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    result = compact(PauseAfterTheSwap(), "readings")  # type: ignore[arg-type]
    assert result.files_before > result.files_after > 0
    assert table_items(store) == expected("a", 3, 6)  # every file the catalog names is there


def test_gc_keeps_the_payloads_of_a_cancelled_run_for_its_replay(backend: Backend) -> None:
    # A replay of a cancelled run runs the chunks the cancel stopped: gc took
    # their offloaded payloads (it kept those of runs with dead chunks only),
    # and the replay then ran chunks whose payloads were gone.
    from fanout import control_ops
    from fanout.tables.gc import collect

    tree = str(TESTS / "testjobs" / "tree.py")
    params = {"chunks": 2, "rows": 2, "children": 1, "depth": 1, "big_payload": 300_000}
    run = coordinator.submit(backend, tree, params)
    deliver(backend, 3)  # the plan and both chunks: their children's payloads offloaded
    assert control_ops.cancel(backend, run.run_id).changed
    assert drain(backend, run.run_id).state == "cancelled"
    payloads = list(backend.store.list(f"runs/{run.run_id}/payloads/"))
    assert len(payloads) == 2
    assert [g for g in collect(backend.store, backend.ledger) if g.reason == "payload"] == []
    assert [t.chunk_id for t in coordinator.replay(backend, run.run_id)] == ["0/0/0", "0/1/0"]
    assert drain(backend, run.run_id).state == "succeeded"


def test_gc_removes_finished_runs_payloads_and_stray_files_not_a_replayable_runs(
    backend: Backend,
) -> None:
    from fanout.tables.gc import collect

    tree = str(TESTS / "testjobs" / "tree.py")
    params = {"chunks": 2, "rows": 2, "children": 1, "depth": 1, "big_payload": 300_000}
    done = coordinator.submit(backend, tree, params)
    assert drain(backend, done.run_id).state == "succeeded"
    failing = {**params, "fail_chunks": [1], "fail_times": 9}
    dead = coordinator.submit(backend, tree, failing, {"max_attempts": 1})
    assert drain(backend, dead.run_id).state == "failed"
    store = backend.store
    payloads = list(store.list(f"runs/{done.run_id}/payloads/"))
    kept = list(store.list(f"runs/{dead.run_id}/payloads/"))
    assert len(payloads) == 2 and len(kept) == 1  # the children's offloaded payloads
    # What an attempt that wrote its file and died before its commit leaves.
    stray = f"runs/{done.run_id}/data/0.0-s0-a9-deadbeef.avro"
    store.put(stray, b"not committed")

    found = collect(store, backend.ledger, dry_run=True)
    assert {(g.key, g.reason) for g in found} == {(k, "payload") for k in payloads} | {
        (stray, "uncommitted")
    }
    assert store.exists(stray)
    assert collect(store, backend.ledger) == found
    assert not store.exists(stray) and not list(store.list(f"runs/{done.run_id}/payloads/"))
    assert list(store.list(f"runs/{dead.run_id}/payloads/")) == kept  # for fanout replay
    records = list(coordinator.committed_records(backend, done.run_id))
    assert len(records) == 8  # the committed output is untouched


def test_a_run_gc_removed_for_its_age_is_refused_by_replay_and_cat(backend: Backend) -> None:
    """Replay reran the dead chunk of a run whose files gc had removed and
    reported success over a manifest of files no longer there; cat printed a
    KeyError traceback."""
    from fanout.errors import UserError
    from fanout.tables.gc import collect

    tree = str(TESTS / "testjobs" / "tree.py")
    failing = {"chunks": 2, "rows": 2, "fail_chunks": [1], "fail_times": 9}
    dead = coordinator.submit(backend, tree, failing, {"max_attempts": 1})
    assert drain(backend, dead.run_id).state == "failed"
    removed = collect(backend.store, backend.ledger, older_than=0.0)
    assert {g.reason for g in removed} == {"old run"}
    left = list(backend.store.list(f"runs/{dead.run_id}/"))
    assert left == [f"runs/{dead.run_id}/_collected.json"]
    for attempt in (
        lambda: coordinator.replay(backend, dead.run_id),
        lambda: list(coordinator.committed_records(backend, dead.run_id)),
    ):
        with pytest.raises(UserError, match="removed by `fanout gc --older-than` at 20"):
            attempt()
    assert collect(backend.store, backend.ledger, older_than=0.0) == []  # the note stays


def test_status_of_a_run_gc_removed_does_not_point_at_its_manifest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ran = fanout(home, "run", JOB, "-p", "chunks=1", "-p", "rows=2", "--json")
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]
    before = fanout(home, "status", run_id)
    assert f"manifest: {home / 'store' / 'runs' / run_id / '_manifest.json'}" in before.stdout
    assert fanout(home, "gc", "--older-than", "0s").returncode == 0
    after = fanout(home, "status", run_id)
    assert after.returncode == 0, after.stderr
    assert "manifest: removed with the run's files by `fanout gc --older-than`" in after.stdout


def test_replay_of_a_run_whose_files_expired_without_gc_is_refused(backend: Backend) -> None:
    # The bucket's RunRetentionDays rule expires runs/ objects (gc's note too):
    # replay reran the dead chunk into a manifest of files no longer there.
    from fanout.errors import UserError

    tree = str(TESTS / "testjobs" / "tree.py")
    failing = {"chunks": 2, "rows": 2, "fail_chunks": [1], "fail_times": 9}
    dead = coordinator.submit(backend, tree, failing, {"max_attempts": 1})
    assert drain(backend, dead.run_id).state == "failed"
    for key in list(backend.store.list(f"runs/{dead.run_id}/")):
        backend.store.delete(key)
    with pytest.raises(UserError, match="output files are gone"):
        coordinator.replay(backend, dead.run_id)


def test_cat_of_a_run_whose_file_is_gone_names_the_file(backend: Backend) -> None:
    from fanout.errors import UserError

    run = run_job(backend, tag="a", chunks=2, rows=6)
    gone = coordinator.read_manifest(backend, run.run_id)["files"][0]["key"]
    backend.store.delete(gone)  # as a compaction of its table does
    with pytest.raises(UserError, match=f"output file {gone} is gone"):
        list(coordinator.committed_records(backend, run.run_id))


#: Where a compaction is killed: (operation, key substring, nth), one run each.
KILL_POINTS = [
    ("put", "/_compactions/", 1),  # intent written, no new file yet
    ("put", "/compact-", 1),  # some new files written
    ("put", "/_catalog/", 1),  # swapped, nothing deleted
    ("delete", ".avro", 1),  # the first old file deleted
    ("delete", ".avro", 150),  # most old files deleted
    ("delete", "/_compactions/", 1),  # all done but the process's own exit
]


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local home whose table holds 200 small files (100 chunks x 2 days)."""
    home = tmp_path_factory.mktemp("small") / "home"
    backend = open_backend("local", home=home)
    try:
        run = run_job(backend, tag="a", chunks=100, rows=4, days=2)
        assert run.state == "succeeded"
        catalog = read_catalog(backend.store, "readings")
        assert catalog is not None and len(catalog.files) == 200
    finally:
        backend.close()
    return home


@pytest.mark.parametrize(("op", "key", "nth"), KILL_POINTS)
def test_compaction_killed_at_each_step_keeps_every_record_once(
    small_files: Path, tmp_path: Path, op: str, key: str, nth: int
) -> None:
    home = tmp_path / "home"
    shutil.copytree(small_files, home)
    want = expected("a", 100, 4)
    killed = fanout(
        home,
        "compact",
        "readings",
        "--target-mb",
        "0.01",
        script=str(TESTS / "support" / "kill_at.py"),
        FANOUT_TEST_KILL_OP=op,
        FANOUT_TEST_KILL_KEY=key,
        FANOUT_TEST_KILL_NTH=str(nth),
    )
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    backend = open_backend("local", home=home)
    try:
        assert table_items(backend.store) == want  # right after the kill
        rerun = fanout(home, "compact", "readings", "--target-mb", "0.01")
        assert rerun.returncode == 0, rerun.stderr
        assert table_items(backend.store) == want
        catalog = read_catalog(backend.store, "readings")
        assert catalog is not None
        assert len(catalog.files) < 20  # 200 small files became a few
        # Nothing but the catalog's files, its versions and (before the swap
        # only) the killed compaction's intent and the files it names.
        on_disk = {
            str(p.relative_to(home / "store"))
            for p in (home / "store" / "tables").rglob("*")
            if p.is_file()
        }
        live = {f["key"] for f in catalog.files}
        extra = {k for k in on_disk - live if "/_catalog/" not in k}
        intents = [k for k in extra if "/_compactions/" in k]
        named = set()
        for ikey in intents:
            for group in json.loads(backend.store.get(ikey))["groups"]:
                named.add(group["new"])
        assert extra - set(intents) <= named
        if op != "put" or key == "/_catalog/":
            assert not extra  # swapped (or never started): nothing left over
    finally:
        backend.close()


def test_a_read_that_a_compaction_overtakes_says_so_in_one_line(
    small_files: Path, tmp_path: Path
) -> None:
    # A compaction swapped and deleted the files of the catalog version the
    # read began with: the read died with a KeyError traceback, part printed.
    home = tmp_path / "home"
    shutil.copytree(small_files, home)
    script = str(TESTS / "support" / "compact_mid_read.py")
    read = fanout(home, "read", "readings", script=script, FANOUT_TEST_COMPACT="readings")
    assert read.returncode == 2, read.stderr
    (line,) = read.stderr.splitlines()
    assert line.startswith("error: table readings changed while it was read"), line
    assert "compaction" in line and "read it again" in line, line
    assert f"after {len(read.stdout.splitlines())} records" in line, line
    again = fanout(home, "read", "readings")  # and then reads whole
    assert again.returncode == 0, again.stderr
    assert len(again.stdout.splitlines()) == sum(expected("a", 100, 4).values())


def test_a_table_file_or_catalog_damaged_by_hand_is_one_line(
    small_files: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(small_files, home)
    backend = open_backend("local", home=home)
    try:
        catalog = read_catalog(backend.store, "readings")
        assert catalog is not None
        gone = catalog.files[5]["key"]
        backend.store.delete(gone)
        read = fanout(home, "read", "readings")
        assert read.returncode == 2 and "Traceback" not in read.stderr
        assert read.stderr.strip() == (
            f"error: table readings: its file {gone} is in the catalog but not in the store"
        )
        newest = home / "store" / "tables" / "readings" / "_catalog"
        latest = max(newest.iterdir(), key=lambda p: p.name)
        latest.write_text("{bad")
        for args in (["read", "readings"], ["tables"], ["schema", "readings"]):
            done = fanout(home, *args)
            assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
            assert "is not a fanout catalog" in done.stderr, (args, done.stderr)
    finally:
        backend.close()


def test_tables_on_a_home_without_any_says_so_to_a_person(tmp_path: Path) -> None:
    empty = fanout(tmp_path / "home", "tables")
    assert empty.returncode == 0 and empty.stdout == ""
    assert empty.stderr.strip() == "no tables yet (a job with a table spec writes one)"
    as_json = fanout(tmp_path / "home", "tables", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == [] and as_json.stderr == ""


def test_read_names_a_partition_the_table_does_not_have(tmp_path: Path) -> None:
    # `read --partition dt=1999-01-01` printed nothing and exited 0, as for an
    # empty partition; `compact` already said no such partition.
    home = tmp_path / "home"
    ran = fanout(home, "run", JOB, "-p", "chunks=1", "-p", "rows=4", "-p", "days=2", "--json")
    assert ran.returncode == 0, ran.stderr
    day = fanout(home, "read", "readings", "--partition", "dt=2024-01-01")
    assert day.returncode == 0 and len(day.stdout.splitlines()) == 2, day.stderr
    for partition in ("dt=1999-01-01", "garbage", "../x"):
        missing = fanout(home, "read", "readings", "--partition", partition)
        assert missing.returncode == 2 and missing.stdout == ""
        assert missing.stderr.strip() == f"error: table readings has no partition {partition!r}"


def test_a_table_job_s_records_from_a_second_thread_fail_its_chunk() -> None:
    # As a plain job's do (tests/test_job_values.py): the partitioned writer's
    # own count and record numbers would race, whatever each partition's
    # writer does.
    from datetime import UTC, datetime

    from fanout.errors import PermanentError
    from fanout.tables.writer import make_writer
    from testjobs.readings_table import job

    assert job.schema is not None
    writer = make_writer(job, job.schema, "null")
    day = datetime(2024, 1, 1, tzinfo=UTC)
    writer.add({"item": "a", "read_at": day, "kwh": 1.0})
    raised = add_from_another_thread(writer, {"item": "b", "read_at": day, "kwh": 2.0})
    assert len(raised) == 1 and isinstance(raised[0], PermanentError), raised
    assert "second thread" in str(raised[0])
    with pytest.raises(PermanentError, match="second thread"):
        writer.finish_file()
    assert writer.count == 1 and writer.size > 0


def test_a_table_writer_s_size_may_be_asked_while_partitions_are_added() -> None:
    # ctx.time_left() reads it, from any thread: while the emitting thread
    # added partitions, it raised "dictionary changed size during iteration".
    import threading
    from datetime import UTC, datetime, timedelta

    from fanout.tables.writer import make_writer
    from testjobs.readings_table import job

    assert job.schema is not None
    writer = make_writer(job, job.schema, "null")
    day = datetime(2000, 1, 1, tzinfo=UTC)
    done = threading.Event()
    errors: list[BaseException] = []

    def ask() -> None:
        while not done.is_set():
            try:
                writer.size  # noqa: B018
            except BaseException as exc:
                errors.append(exc)
                return

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        for n in range(3000):
            writer.add({"item": str(n), "read_at": day + timedelta(days=n), "kwh": 1.0})
    finally:
        done.set()
        asking.join()
    assert errors == []


def test_a_schema_changed_after_submit_does_not_reach_the_table(
    ledger: Backend, tmp_path: Path
) -> None:
    # The contract is checked at submit; a worker loading the job later, with
    # its .avsc edited meanwhile (n: long -> double), wrote files the table's
    # catalog (n: long) cannot read: the run succeeded, `fanout read` failed
    # midway and `compact` crashed (found by a black-box helper).
    from fanout.tables.catalog import read_catalog as catalog_of

    (tmp_path / "schemas").mkdir()
    avsc = tmp_path / "schemas" / "rec.avsc"
    fields = (
        '[{"name":"item","type":"string"},{"name":"site","type":"string"},{"name":"n","type":"%s"}]'
    )
    avsc.write_text('{"type":"record","name":"rec","fields":%s}' % (fields % "long"))
    job = tmp_path / "sk.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('sk', schema='rec', partition_by='site', table='sk', max_attempts=2)\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'item': 'x', 'site': 'north', 'n': chunk.get('n', 1)})\n"
    )
    first = coordinator.submit(ledger, str(job), {})
    assert drain(ledger, first.run_id).state == "succeeded"
    second = coordinator.submit(ledger, str(job), {"n": 2})
    avsc.write_text('{"type":"record","name":"rec","fields":%s}' % (fields % "double"))
    assert drain(ledger, second.run_id).state == "failed"
    (dead,) = ledger.ledger.list_tasks(second.run_id, (TaskState.DEAD,))
    assert dead.attempt == 1 and "schema changed since the run was submitted" in (dead.error or "")
    catalog = catalog_of(ledger.store, "sk")
    assert catalog is not None and len(catalog.schemas) == 1
    files = [k for k in ledger.store.list("tables/sk/") if k.endswith(".avro")]
    assert len(files) == 1  # the first run's only: nothing the catalog cannot read


def test_a_plain_run_replayed_after_a_schema_change_is_not_written_in_two_schemas(
    ledger: Backend, tmp_path: Path
) -> None:
    # A chunk died of a bad record (qty "3 units" for an int); the user made
    # qty a string and replayed: the run succeeded with files in two schemas
    # (qty 3 and qty "3 units") and a manifest naming only the first, which a
    # reader given it could not read the new file with (a black-box helper's).
    (tmp_path / "schemas").mkdir()
    avsc = tmp_path / "schemas" / "sale.avsc"
    schema = '{"type":"record","name":"sale","fields":[{"name":"qty","type":"%s"}]}'
    avsc.write_text(schema % "int")
    job = tmp_path / "sales.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('sales', schema='sale', max_attempts=1)\n"
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    return [{'qty': 3}, {'qty': '3 units'}]\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'qty': chunk['qty']})\n"
    )
    run = coordinator.submit(ledger, str(job), {})
    assert drain(ledger, run.run_id).state == "failed"
    avsc.write_text(schema % "string")
    # (`fanout replay --work` is a new process, which loads the job anew; so here.)
    job.write_text(job.read_text() + "# qty is a string now\n")
    assert [t.chunk_id for t in coordinator.replay(ledger, run.run_id)] == ["0/1"]
    assert drain(ledger, run.run_id).state == "failed"
    (dead,) = ledger.ledger.list_tasks(run.run_id, (TaskState.DEAD,))
    assert "schema changed since the run was submitted (field 'qty' changed)" in (dead.error or "")
    assert "its files and manifest are in the old one" in (dead.error or "")
    assert [r["qty"] for r in coordinator.committed_records(ledger, run.run_id)] == [3]


def test_a_partition_value_too_long_or_out_of_range_is_a_record_error() -> None:
    # A value ~250 bytes escaped made a file name the disk refused ("File name
    # too long"), and a time past year 9999 in UTC an OverflowError: both
    # internal errors, retried until the chunk died, naming no record (found
    # by a black-box helper). Each is the record's fault, told at once.
    from fanout.errors import RecordError
    from fanout.tables.spec import TableSpec, partition_value

    by_site = TableSpec("t", "site")
    assert partition_value(by_site, {"site": "中" * 20}, 0, None).startswith("site=%E4")
    with pytest.raises(RecordError, match="record 4: field 'site' is too long to partition by"):
        partition_value(by_site, {"site": "中" * 40}, 4, None)
    by_hour = TableSpec("t", "at", "hour")
    with pytest.raises(RecordError, match="record 2: field 'at' is not a time to partition by"):
        partition_value(by_hour, {"at": "9999-12-31T23:59:59-01:00"}, 2, None)
    with pytest.raises(RecordError, match="not a time"):
        partition_value(by_hour, {"at": 10**18}, 0, "timestamp-millis")
    # Years before 1000 keep the yyyy of every other partition (dt=1-01-01-00 was).
    assert partition_value(by_hour, {"at": "0001-01-01T00:30:00+00:00"}, 0, None) == (
        "dt=0001-01-01-00"
    )
