"""The end of a run: once its outstanding counter reaches zero, write
``runs/<run_id>/_manifest.json`` listing exactly the committed files, record
the run's final state and announce it (``run.finished``).

One finalizer at a time: :meth:`~fanout.backends.base.Ledger.begin_finalize`
grants the run to one caller, and again to another once the first has been at
it for :data:`FINALIZE_STALE` seconds (it is presumed dead). A finalizer that
was only slow must then leave the run alone, or its manifest, listing the files
of its time, could replace a later one (a replay reopened and finished the run
meanwhile). So it writes the manifest only if the ledger still names it just
before the write, and records the final state only if the ledger still names
it (``finish(began=...)``). A finalizer that takes over after that check still
has the whole manifest to build before it writes its own, so the later write
is the newer one, unless this process stalls between the check and its write
for longer than that (a store without conditional writes cannot fence it).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fanout.backends.base import Ledger, RunState, Store, TaskState
from fanout.backends.keys import manifest_key
from fanout.controls import final_state
from fanout.errors import UserError
from fanout.events import EventSink, emit
from fanout.limits import SCHEMA, table_spec_of
from fanout.tables.commit import compact_run_partitions, expand_parts, join_table, update_glue
from fanout.tables.contract import release_schema

log = logging.getLogger("fanout.runner")

#: A finalizer that has not finished after this long is presumed dead.
FINALIZE_STALE = 60.0


def finalize_run(
    ledger: Ledger,
    store: Store,
    events: EventSink,
    run_id: str,
    stale_after: float = FINALIZE_STALE,
) -> bool:
    """Write the manifest of a drained run and record its final state.
    Only one caller per drain does the work; returns whether this one did."""
    now = time.time()
    if not ledger.begin_finalize(run_id, now, stale_after):
        return False
    record = ledger.get_run(run_id)
    assert record is not None
    done = ledger.list_tasks(run_id, (TaskState.DONE,), history=False)
    dead = ledger.list_tasks(run_id, (TaskState.DEAD,), history=False)
    files = [
        {
            "key": t.output.key,
            "records": t.output.records,
            "bytes": t.output.bytes,
            "chunk_id": t.chunk_id,
            "seq": t.seq,
        }
        for t in done
        if t.output is not None
    ]
    # Stopped, failed, succeeded, or (run controls) cancelled, succeeded with failures.
    state = final_state(record, len(dead))
    manifest: dict[str, Any] = {
        "version": 1,
        "run_id": run_id,
        "job": record.job_name,
        "state": state.value,
        "stop_reason": record.stop_reason,
        "created_at": record.created_at,
        "finished_at": now,
        "records": sum(f["records"] for f in files),
        "files": files,
        "dead_chunks": [{"chunk_id": t.chunk_id, "seq": t.seq, "error": t.error} for t in dead],
        "schema": record.settings.get(SCHEMA),
    }
    manifest = expand_parts(store, manifest)  # issue 14: a table's files, by partition
    if not _still_mine(ledger, run_id, now):
        return False
    key = manifest_key(run_id)
    store.put(key, json.dumps(manifest, indent=1).encode())
    # Issue 14: idempotent, so before the run is marked finished.
    try:
        update_glue(store, join_table(store, manifest))
    except UserError as exc:
        # Its table can no longer take its files (another schema came while a
        # replay raced its end): said, in a run that fails, rather than a
        # finalizer that fails forever. Its files stay in its manifest.
        log.error("run %s: %s", run_id, exc)
        state = RunState.FAILED
        manifest = {**manifest, "state": state.value, "table_error": str(exc)}
        store.put(key, json.dumps(manifest, indent=1).encode())
    spec = table_spec_of(record.settings)
    if (
        spec is not None
        and not any(f.get("table") == spec.table for f in manifest["files"])
        and _still_mine(ledger, run_id, now)  # (a replay since holds it again)
    ):
        release_schema(store, spec.table, run_id)  # no file: its schema is not the table's
    if record.settings.get("compact") and _still_mine(ledger, run_id, now):
        compact_run_partitions(store, manifest)  # issue 14: -S compact=true
    if not ledger.finish(run_id, state, key, time.time(), began=now):
        log.error(
            "run %s: taken over by another finalizer, or reopened, while this one wrote"
            " the manifest; the finalizer that finishes it writes it again",
            run_id,
        )
        return False
    emit(
        events,
        "run.finished",
        run_id,
        job=record.job_name,
        state=state.value,
        stop_reason=record.stop_reason,
        records=manifest["records"],
        files=len(files),
        dead_chunks=len(dead),
        manifest=key,
    )
    log.info(
        "run %s %s: %d records in %d files",
        run_id,
        state.value,
        manifest["records"],
        len(files),
    )
    return True


def _still_mine(ledger: Ledger, run_id: str, began: float) -> bool:
    """Whether the ledger still names the finalizer that began at ``began``."""
    run = ledger.get_run(run_id)
    if run is not None and run.state is RunState.FINALIZING and run.finalize_at == began:
        return True
    log.warning(
        "run %s: another finalizer took over after %.0fs; this one leaves the run to it",
        run_id,
        time.time() - began,
    )
    return False
