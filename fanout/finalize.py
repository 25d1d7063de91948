"""The end of a run: once its outstanding counter reaches zero, write
``runs/<run_id>/_manifest.json`` listing exactly the committed files, record
the run's final state and announce it (``run.finished``)."""

from __future__ import annotations

import json
import logging
import time

from fanout.backends.base import Ledger, Store, TaskState
from fanout.backends.keys import manifest_key
from fanout.controls import final_state
from fanout.events import EventSink, emit
from fanout.limits import SCHEMA
from fanout.tables.commit import compact_run_partitions, expand_parts, join_table, update_glue

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
    manifest = {
        "version": 1,
        "run_id": run_id,
        "job": record.job_name,
        "state": state.value,
        "stop_reason": record.stop_reason,
        "created_at": record.created_at,
        "finished_at": now,
        "records": sum(f["records"] for f in files),  # type: ignore[misc]
        "files": files,
        "dead_chunks": [{"chunk_id": t.chunk_id, "seq": t.seq, "error": t.error} for t in dead],
        "schema": record.settings.get(SCHEMA),
    }
    manifest = expand_parts(store, manifest)  # issue 14: a table's files, by partition
    key = manifest_key(run_id)
    store.put(key, json.dumps(manifest, indent=1).encode())
    # Issue 14: idempotent, so before the run is marked finished.
    update_glue(store, join_table(store, manifest))
    if record.settings.get("compact"):
        compact_run_partitions(store, manifest)  # issue 14: -S compact=true
    ledger.finish(run_id, state, key, time.time())
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
