"""Runs as a whole: submit, replay dead chunks, repair stalls, report status."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pydantic import BaseModel

from fanout import control_ops
from fanout.backends import keys
from fanout.backends.base import (
    TERMINAL_RUN_STATES,
    Backend,
    FailureKind,
    NewTask,
    RunRecord,
    RunState,
    TaskRecord,
    TaskState,
)
from fanout.backends.rules import replay_revives, replayable
from fanout.backends.runcontrols import controls_of
from fanout.controls import display_state, paused_seconds, set_paused
from fanout.errors import RunFinalizingError, UnknownRunError, UserError
from fanout.events import events_for
from fanout.fairness import register_run, served_runs
from fanout.finalize import FINALIZE_STALE, finalize_run
from fanout.jobs import canonical_ref, load_checked
from fanout.limits import SCHEMA, table_setting, table_spec_of
from fanout.messages import ChunkMessage, MessageError, decode, offload, resolve
from fanout.settings import RunKind, kind_of, recorded_settings
from fanout.tables.contract import check_contract, hold_for_replay, release_schema
from fanout.tables.spec import TableSpec

log = logging.getLogger("fanout.coordinator")


def new_run_id(job_name: str) -> str:
    """``<job>-<UTC yyyymmddThhmmss>-<6 hex>``: sortable by time, unique."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{job_name}-{stamp}-{secrets.token_hex(3)}"


def submit(
    backend: Backend,
    job_ref: str,
    params: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> RunRecord:
    """Validate the job and its params, record the run and enqueue its first chunk.

    Raises :class:`UserError` (one line) for a job that does not load, params
    that do not validate or settings that are out of range.
    """
    job, model = load_checked(job_ref, params or {})
    raw_params = model.model_dump(mode="json") if isinstance(model, BaseModel) else dict(model)
    run_settings = job.settings.overridden(settings or {})
    raw_schema = job.schema.raw if job.schema else None
    run_id = run_id or new_run_id(job.name)
    spec = job.table_spec
    if spec is not None:  # issue 14: the table's schema contract, before any write
        check_contract(backend.store, spec, raw_schema, job.name, run_id=run_id)
    now = time.time()
    run = RunRecord(
        run_id=run_id,
        job=canonical_ref(job_ref),
        job_name=job.name,
        params=raw_params,
        settings=recorded_settings(
            run_settings,
            job.kind,
            raw_schema,
            table_setting(spec),
            planned=job.plan_fn is not None,
        ),
        created_at=now,
    )
    # A job without a plan gets one chunk holding the params.
    if job.plan_fn is not None:
        root = ChunkMessage(run_id=run.run_id, chunk_id="0", kind="plan")
    else:
        root = ChunkMessage(run_id=run.run_id, chunk_id="0", payload=raw_params)
    # A token of this submit's own: a second submit of the same run id (a
    # schedule's tick fired twice) writes its payload apart, and loses at create_run.
    try:
        body = offload(root, backend.store, backend.queue.max_message_bytes, secrets.token_hex(8))
        backend.ledger.create_run(run, NewTask("0", 0, 0, body))
    except KeyError:
        raise  # the run exists (a twin submit of a schedule tick): it holds its version
    except BaseException:
        if spec is not None:
            _unheld(backend, spec, run.run_id)
        raise
    register_run(backend.queue, run.run_id, run_settings.priority)  # fair sharing by priority
    # Should this send be lost (a crash right here), the recovery sweep re-sends
    # queued tasks of a run that has nothing in the queue.
    backend.queue.send([body])
    return run


def _unheld(backend: Backend, spec: TableSpec, run_id: str) -> None:
    """A submit failed after its schema check: no run, nothing holds the version
    for it. (A failure that may yet have made the run, a timeout, leaves it.)"""
    try:
        if backend.ledger.get_run(run_id) is None:
            release_schema(backend.store, spec.table, run_id)
    except Exception as exc:  # the ledger or store down: the hold stays
        log.warning("run %s was not made; its schema hold stays: %s", run_id, exc)


def get_run(backend: Backend, run_id: str) -> RunRecord:
    """The run, with a crawl's per-domain counters wherever the ledger keeps
    them (``Ledger.domain_stats``), or :class:`UnknownRunError`."""
    run = backend.ledger.get_run(run_id)
    if run is None:
        raise UnknownRunError(f"unknown run id {run_id!r} (see `fanout runs`)")
    domains = backend.ledger.domain_stats(run_id)
    if domains:
        run = replace(run, stats={**run.stats, **domains})
    return run


#: How long a replay waits for a run's finalizer to finish before it gives up
#: (s): a live finalizer takes a moment; a dead one is taken over by the
#: recovery sweep only after ``FINALIZE_STALE``.
REPLAY_WAIT = 10.0


def replay(
    backend: Backend,
    run_id: str,
    chunk_ids: Collection[str] | None = None,
    *,
    wait: float = REPLAY_WAIT,
) -> list[TaskRecord]:
    """Put dead chunks (all, or those named) back in the queue; the run reopens
    and its manifest is rewritten when it drains again. A stopped run (a
    cancel, its tolerance, a runaway bound) goes on: the chunks its stop
    cancelled come back too, but not those the job's own stop cancelled
    (:func:`~fanout.backends.rules.replay_revives`). A run being finalized
    is waited out for up to ``wait`` seconds, then refused
    (:class:`~fanout.errors.RunFinalizingError`): the ledger will not reopen it
    while its manifest is written. A finalizer dead for ``FINALIZE_STALE`` is
    taken over meanwhile. Locally, a job that still does not load is refused
    (:class:`UserError`), not run into the same death once more."""
    run = get_run(backend, run_id)
    if backend.name != "aws":  # (on AWS the job is the deployed code's, not this machine's)
        _job_loads(run)
    _not_collected(backend, run_id)
    _outputs_kept(backend, run_id)
    dead = backend.ledger.list_tasks(run_id, (TaskState.DEAD,))
    if chunk_ids:
        _named_chunks_replayable(backend, run, set(chunk_ids) - {t.chunk_id for t in dead})
    elif not replayable(len(dead), run.tasks_cancelled):
        raise UserError(f"run {run_id} has no dead chunks to replay")
    # Its end may have given back the table schema version it had not written
    # with: held again (idempotent) before anything is reopened, so that a table
    # that can no longer take its files refuses the replay; and again after,
    # should the end of a finalizer the reopen waited for have given it back.
    spec = table_spec_of(run.settings)
    hold = partial(_hold_version, backend, run, spec)
    took = hold()
    try:
        reopened = _reopen(backend, run_id, chunk_ids, wait)
    except BaseException:
        if spec is not None and took:  # (the hold this replay took, only)
            release_schema(backend.store, spec.table, run_id)
        raise
    try:
        hold()
    except Exception as exc:  # (a submit in that moment: its join will say why it cannot)
        log.warning("run %s: its table schema version could not be held again: %s", run_id, exc)
    if run.state in TERMINAL_RUN_STATES:
        # A pause that outlived its run's end (one that landed beside a cancel)
        # would hold the replay's chunks, unseen: the replay starts it afresh.
        now = time.time()
        controls_of(backend.ledger).change_control(
            run_id, lambda state: set_paused(state, False, now)
        )
    backend.queue.send([t.message for t in reopened])
    return reopened


def _hold_version(backend: Backend, run: RunRecord, spec: TableSpec | None) -> bool:
    """The run's hold on its table's schema version (see :func:`replay`):
    whether it took one."""
    if spec is None:
        return False
    schema = run.settings.get(SCHEMA)
    return hold_for_replay(backend.store, spec, schema, run.run_id, run.job_name)


def _reopen(
    backend: Backend, run_id: str, chunk_ids: Collection[str] | None, wait: float
) -> list[TaskRecord]:
    """The ledger's reopen, a run being finalized waited out (see :func:`replay`)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            reopened = backend.ledger.reopen(
                run_id, set(chunk_ids) if chunk_ids else None, time.time()
            )
            break
        except RunFinalizingError:
            # A finalizer that died is taken over here, as the recovery sweep
            # would (only once it is FINALIZE_STALE): no worker may be running.
            finalize_run(backend.ledger, backend.store, events_for(backend), run_id, FINALIZE_STALE)
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if not reopened and not chunk_ids:
        # (nothing dead, and what was cancelled was orphans or the job's own stop's)
        raise UserError(f"run {run_id} has no dead chunks to replay")
    return reopened


def _named_chunks_replayable(backend: Backend, run: RunRecord, not_dead: set[str]) -> None:
    """``replay --chunk``: a name that is no dead chunk must be one the run's
    stop cancelled (the replay puts those back anyway); else one line says why."""
    if not not_dead:
        return
    cancelled = backend.ledger.list_tasks(run.run_id, (TaskState.CANCELLED,))
    revived = {t.chunk_id for t in cancelled if replay_revives(run.stop_reason, t)}
    unknown = sorted(not_dead - revived)
    if not unknown:
        return
    name = unknown[0]
    if name in {t.chunk_id for t in cancelled}:
        raise UserError(
            f"run {run.run_id}'s chunk {name!r} was cancelled by the job's own stop"
            " (ctx.stop_run) or as an orphan: a replay does not run it again"
        )
    raise UserError(f"run {run.run_id} has no dead chunk {name!r} (see `fanout failed`)")


def _job_loads(run: RunRecord) -> None:
    """A replay comes after a fix: a job file that still fails to import, or no
    longer takes the run's params, is told in one line before any chunk is
    reopened (each would otherwise spend its attempts and die again)."""
    try:
        load_checked(run.job, run.params)
    except UserError as exc:
        raise UserError(f"run {run.run_id}: its job must load before a replay: {exc}") from None


#: A running run whose tasks (and counters) have not changed for this long,
#: with no lease live, is stalled: its queued tasks are re-sent even though the
#: queue is not empty (see ``recover``). Longer than SQS's longest delay (15 min).
STALLED = 1200.0


def recover(
    backend: Backend,
    stale_after: float = FINALIZE_STALE,
    *,
    redrive: bool = True,
    stalled_after: float = STALLED,
) -> list[str]:
    """Repair what a crash at the wrong moment can leave behind; returns what it did.

    - a drained run whose finalizer died before writing the manifest is finalized;
    - a running run with work registered but nothing at all in the queue (the
      send after a ledger write was lost) has its queued tasks re-sent; so has,
      on a ``redrive`` call, a run stalled for ``stalled_after`` seconds while
      the queue is not empty: other runs' messages (or SQS's approximate
      count) may keep it from ever looking empty. A duplicate is harmless:
      the ledger's claim skips a task that is running or finished;
    - messages the queue service dead-lettered (SQS moves a message received
      too often, e.g. a task that kept waiting on a long back-off, to the DLQ)
      are moved back: the ledger, not the queue, decides when a task is dead.
    Safe to call at any time from any process; called by idle workers, which
    pass ``redrive=False`` on most calls (reading the DLQ costs requests).
    A queue that serves some runs only (``fanout run``'s, see
    ``fanout.fairness.serve_run_only``) counts only their messages as pending,
    so only those runs are looked at: other runs' messages do not make one of
    its own lost wait ``stalled_after``, and other runs do not look empty.
    """
    actions = []
    moved, redrive_error = 0, None
    if redrive:
        try:
            moved = backend.queue.redrive()
        except Exception as exc:
            # The DLQ's messages wait for the next sweep; stranded tasks and
            # dead finalizers, below, must not. Raised at the end, for the
            # caller to report as before.
            redrive_error = exc
    if moved:
        actions.append(f"moved {moved} dead-lettered messages back to the queue")
    states = (RunState.RUNNING, RunState.FINALIZING)
    runs = served_runs(backend.queue)
    if runs is None:
        open_runs = backend.ledger.list_runs(limit=1000, states=states)
    else:
        found = (backend.ledger.get_run(run_id) for run_id in sorted(runs))
        open_runs = [run for run in found if run is not None and run.state in states]
    for run in open_runs:
        if run.outstanding == 0 and finalize_run(
            backend.ledger, backend.store, events_for(backend), run.run_id, stale_after
        ):
            actions.append(f"finalized {run.run_id}")
    empty = bool(open_runs) and backend.queue.pending() == 0
    if empty or (open_runs and redrive):
        now = time.time()
        for run in open_runs:
            # Run controls: a paused run's messages were dropped on purpose.
            if run.outstanding == 0 or control_ops.sweep(backend, run):
                continue
            stranded = _stranded(backend, run, now, None if empty else stalled_after)
            if stranded:
                backend.queue.send(stranded)
                actions.append(f"re-sent {len(stranded)} stranded tasks of {run.run_id}")
    if redrive_error is not None:
        for action in actions:  # (the caller logs them when it gets them)
            log.warning("recovery sweep: %s", action)
        raise redrive_error
    return actions


def _stranded(
    backend: Backend, run: RunRecord, now: float, stalled_after: float | None
) -> list[str]:
    """The messages of ``run``'s tasks that no message in the queue may carry:
    with an empty queue (``stalled_after`` None), every queued task and every
    running one whose lease expired; else only if the run is stalled."""
    tasks = backend.ledger.list_tasks(run.run_id, (TaskState.QUEUED, TaskState.RUNNING))
    if stalled_after is None:
        return [t.message for t in tasks if t.state == TaskState.QUEUED or t.lease_expires < now]
    if any(t.state == TaskState.RUNNING and t.lease_expires >= now for t in tasks):
        return []  # a chunk is running: not stalled
    last = max([run.updated_at, *(t.updated_at for t in tasks)])
    if now - last < stalled_after:
        return []
    # Not those in back-off or delayed (their message is delayed in the queue).
    return [t.message for t in tasks if t.not_before <= now]


@dataclass
class Status:
    """A run's progress, for ``fanout status`` (and its ``--json``)."""

    run: RunRecord
    tasks: dict[str, int] = field(default_factory=dict)
    pending_requests: int = 0  # crawl requests waiting in chunks not yet finished
    timed_out: int = 0  # attempts killed at their hard timeout (a timeout is never silent)
    crashed: int = 0  # attempts whose worker died, or whose lease expired unheard
    #: The latest timed-out attempt: chunk_id, seq, attempt, at, and the cursor it
    #: started from (its last checkpoint; None for a chunk's first slice).
    last_timeout: dict[str, Any] | None = None
    #: A crawl's domains backed off run-wide now (a 429/503 answer), with the
    #: seconds their back-off has left.
    backoffs: dict[str, float] = field(default_factory=dict)
    #: Seconds the run was paused (``fanout pause``), left out of ``elapsed``.
    paused_for: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds the run has been let run: its life, less its pauses."""
        end = self.run.finished_at or time.time()
        return max(0.0, end - self.run.created_at - self.paused_for)

    @property
    def rate(self) -> float:
        """Records per second over the run's life, its pauses left out."""
        return self.run.records / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        r = self.run
        return {
            "run_id": r.run_id,
            "job": r.job_name,
            "kind": kind_of(r.settings).value,
            "state": r.state.value,
            "stop_reason": r.stop_reason,
            "chunks": self.tasks,
            "outstanding": r.outstanding,
            "retries": r.retries,
            "records": r.records,
            "bytes": r.bytes,
            "elapsed_s": round(self.elapsed, 3),
            "records_per_s": round(self.rate, 1),
            "created_at": r.created_at,
            "finished_at": r.finished_at,
            "manifest": r.manifest_key,
            "stats": r.stats,
            "pending_requests": self.pending_requests,
            "timed_out": self.timed_out,
            "crashed": self.crashed,
            "last_timeout": self.last_timeout,
            "backoffs": self.backoffs,
        }


def live_status(
    backend: Backend, run: RunRecord, counts: dict[str, int] | None = None
) -> tuple[Status, str]:
    """What a progress display shows of ``run`` (read just now): its counters,
    its pauses left out of its rate, and its state as shown (``paused``,
    ``cancelling``...), from one read of its controls. ``counts``: its tasks by
    state, where the display has them."""
    paused_for, paused = _pauses(backend, run)
    return Status(run, dict(counts or {}), paused_for=paused_for), display_state(run, paused)


def _pauses(backend: Backend, run: RunRecord) -> tuple[float, bool]:
    """From one read of the run's controls: the seconds it was paused (up to
    now, or its end) and whether it is paused now."""
    control = controls_of(backend.ledger).read_control(run.run_id)
    return paused_seconds(control, run.finished_at or time.time()), bool(control.get("paused"))


def status(backend: Backend, run_id: str) -> Status:
    """Counts of the run's tasks by state, with its counters."""
    run = get_run(backend, run_id)
    crawl = kind_of(run.settings) is RunKind.CRAWL
    counts = {s.value: 0 for s in TaskState}
    pending = timed_out = crashed = 0
    last: tuple[float, TaskRecord, dict[str, object]] | None = None
    for task in backend.ledger.list_tasks(run_id):
        counts[task.state.value] += 1
        for event in task.history:
            if event.get("outcome") == FailureKind.CRASHED:
                crashed += 1
            elif event.get("outcome") == FailureKind.TIMED_OUT:
                timed_out += 1
                stamp = event.get("at")
                at = float(stamp) if isinstance(stamp, int | float) else 0.0
                if last is None or at >= last[0]:
                    last = (at, task, event)
        if crawl and task.state in (TaskState.QUEUED, TaskState.RUNNING):
            # A crawl chunk's payload is the requests it will fetch (CrawlJob._hand_on).
            payload = json.loads(task.message).get("payload")
            if isinstance(payload, dict) and isinstance(payload.get("requests"), list):
                pending += len(payload["requests"])
    latest = None
    if last is not None:
        at, task, event = last
        latest = {
            "chunk_id": task.chunk_id,
            "seq": task.seq,
            "attempt": event.get("attempt"),
            "at": at,
            "cursor": checkpoint(backend, task),
        }
    backoffs: dict[str, float] = {}
    if crawl and backend.crawl is not None and run.state not in TERMINAL_RUN_STATES:
        now = time.time()
        ends = backend.crawl.backoffs(run_id, now)
        backoffs = {domain: round(end - now, 1) for domain, end in sorted(ends.items())}
    paused_for, _ = _pauses(backend, run)
    return Status(run, counts, pending, timed_out, crashed, latest, backoffs, paused_for)


def checkpoint(backend: Backend, task: TaskRecord) -> Any:
    """The cursor ``task`` starts from: its chunk's last checkpoint before it
    (None for a chunk's first slice, or if the message cannot be read)."""
    try:
        _, cursor = resolve(decode(task.message), backend.store)
    except (MessageError, KeyError, ValueError):
        return None
    return cursor


def read_manifest(backend: Backend, run_id: str) -> dict[str, Any]:
    """The run's manifest; :class:`UserError` if the run has not finished yet."""
    run = get_run(backend, run_id)
    if run.state not in TERMINAL_RUN_STATES:
        # Includes a replayed run: its old manifest no longer tells the truth.
        raise UserError(f"run {run_id} has not finished (state: {run.state.value})")
    _not_collected(backend, run_id)
    key = run.manifest_key or keys.manifest_key(run_id)
    try:
        manifest: dict[str, Any] = json.loads(backend.store.get(key))
    except KeyError:
        raise UserError(f"run {run_id} has no manifest yet (state: {run.state.value})") from None
    return manifest


def _not_collected(backend: Backend, run_id: str) -> None:
    """:class:`UserError` if ``fanout gc --older-than`` removed the run's objects."""
    try:
        note = json.loads(backend.store.get(keys.collected_key(run_id)))
    except KeyError:
        return
    when = note.get("collected_at") if isinstance(note, dict) else None
    at = ""
    if isinstance(when, int | float):
        at = f" at {datetime.fromtimestamp(when, UTC).isoformat(timespec='seconds')}"
    raise UserError(
        f"run {run_id}'s files were removed by `fanout gc --older-than`{at};"
        " submit the job again for its output"
    )


def _outputs_kept(backend: Backend, run_id: str) -> None:
    """:class:`UserError` if the run's committed files are gone without a note
    of gc's (the bucket's ``RunRetentionDays`` rule expired them, or a hand):
    a replay would finish the run over a manifest of files no longer there.
    One file is looked at, the first committed."""
    for task in backend.ledger.list_tasks(run_id, (TaskState.DONE,), history=False):
        if task.output is not None and task.output.records:
            if not backend.store.exists(task.output.key):
                raise UserError(
                    f"run {run_id}'s output files are gone (first missing:"
                    f" {task.output.key}); submit the job again for its output"
                )
            return


def committed_records(backend: Backend, run_id: str) -> Iterator[dict[str, Any]]:
    """Every committed record of a finished run, in manifest order; a file the
    manifest lists that is gone (compacted into a table, removed by hand) is
    a :class:`UserError` naming it."""
    from fanout.avro import read_records

    for entry in read_manifest(backend, run_id)["files"]:
        try:
            f = backend.store.open(entry["key"])
        except KeyError:
            raise UserError(
                f"run {run_id}'s output file {entry['key']} is gone: compacted into its"
                " table (read that with `fanout read TABLE`), or removed"
            ) from None
        with f:
            yield from read_records(f, entry["key"])
