"""The ledger on DynamoDB: runs, tasks and the fan-in counter in one on-demand
table, which also keeps a crawl's state (:mod:`fanout.backends.aws.crawlstate`).

Layout (single-table design)::

    pk            sk                     what
    RUN#<run>     RUN                    the run and its counters (gsi1: newest first)
    RUN#<run>     TASK#<chunk>#<seq:08>  one task (gsi2: by the parent that registered it)
    RUN#<run>     SEEN#<fingerprint>     a crawl's seen-set entry (fanout.backends.aws.crawlstate)
    RUN#<run>     DOMAIN#<domain>        a crawl's domain lease (run-wide politeness)
    RUN#<run>     DSTAT#<domain>         a crawl's per-domain counters (ledger_stats)

* ``gsi1`` (``gsi1pk = "RUNS"``, ``gsi1sk = <created_at>#<run>``) lists runs newest
  first. It projects only ``state``: the run item's counters change on every
  commit, and a projection of them would double the cost of the hottest writes.
* ``gsi2`` is overloaded: ``KIDS#<run>#<parent>#<seq>`` on tasks (what
  ``queued_children`` and a commit's orphan sweep look up, without scanning the
  run).
  It projects ``state``, ``spawned_by`` and the attempt counters only, so the
  writes that touch none of them (retry history, lease renewals, commits' outputs
  are all state changes, but takeovers of a message are not) stay off the index. Being a GSI, it is
  eventually consistent; see :meth:`DynamoLedger.commit` for why that is safe.

Every state transition is a conditional write (on ``state``, ``lease_token`` or
the item's ``ver``sion), and every task transition moves the run's counters in
the same ``TransactWriteItems``, so the outstanding counter stays exact under
duplicate deliveries and crashes, as in the SQLite ledger this one mirrors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping

from fanout.backends.aws.ledger_items import (
    _RUN_SK,
    MAX_TRANSACTION_ITEMS,
    Item,
    _av,
    _Expr,
    _filter_states,
    _int,
    _is_token,
    _is_version,
    _key,
    _kids_key,
    _py,
    _run,
    _run_key,
    _sum_stats,
    _task,
    _task_key,
    _task_sk,
    create_table,
)
from fanout.backends.aws.ledger_register import RETRIES, Registrar
from fanout.backends.aws.ledger_reopen import Reopener
from fanout.backends.aws.ledger_stats import STATS_IN_COMMIT, DomainStats, split_stats
from fanout.backends.aws.runcontrols import DynamoRunControls
from fanout.backends.base import (
    FINISHED_TASK_STATES,
    Claim,
    ClaimOutcome,
    Failure,
    FailureKind,
    NewTask,
    Output,
    RunRecord,
    RunState,
    Settle,
    TaskEvent,
    TaskKey,
    TaskRecord,
    TaskState,
    took_field,
)
from fanout.backends.rules import (
    CONTENDED_RETRY_AFTER,
    CRASHED_LAST,
    ClaimFacts,
    ClaimVerdict,
    ParentFacts,
    attempt_in_budget,
    cancel_event,
    chunk_order,
    claim_without_write,
    history_event,
    may_have_orphans,
    rule_claim,
    spends_attempt,
)

__all__ = ["DynamoLedger", "create_table"]

log = logging.getLogger(__name__)


class DynamoLedger(Registrar, Reopener, DynamoRunControls, DomainStats):  # + controls, stats
    """The :class:`~fanout.backends.base.Ledger` on one DynamoDB table."""

    def _drained(self, run_id: str) -> bool:
        """Whether the run's outstanding counter is zero now.

        A transaction cannot return values, so the step that finishes a task
        reads the counter right after it. The last finisher always sees zero;
        two finishing at once may both see it, which is harmless: the right
        to finalize is granted once, by :meth:`begin_finalize`."""
        item = self._get(_run_key(run_id), ["outstanding"])
        return item is not None and int(item["outstanding"]["N"]) == 0

    # -- runs ----------------------------------------------------------------------

    def create_run(self, run: RunRecord, root: NewTask) -> None:
        """Create the run and its root task, ``outstanding == 1``, in one transaction."""
        now = run.created_at
        item = {
            **_run_key(run.run_id),
            "gsi1pk": {"S": "RUNS"},
            # Fixed width, so the string order of the index is the time order.
            "gsi1sk": {"S": f"{run.created_at:017.6f}#{run.run_id}"},
            "run_id": {"S": run.run_id},
            "job": {"S": run.job},
            "job_name": {"S": run.job_name},
            "params": {"S": json.dumps(run.params)},
            "settings": {"S": json.dumps(run.settings)},
            "state": {"S": RunState.RUNNING.value},
            "created_at": _av(now),
            "updated_at": _av(now),
            "outstanding": _av(1),
            "tasks_total": _av(1),
            "chunks_total": _av(1),
            **{c: _av(0) for c in ("tasks_done", "tasks_dead", "tasks_cancelled")},
            **{c: _av(0) for c in ("records", "bytes", "retries")},
            # Must exist for commit to sum counters into it (SET stats.#k = ...).
            "stats": {"M": {}},
        }
        absent = "attribute_not_exists(pk)"
        reasons = self._transact(
            [
                {"Put": {"TableName": self.table, "Item": item, "ConditionExpression": absent}},
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": self._new_task(run.run_id, root, now, None),
                        "ConditionExpression": absent,
                    }
                },
            ]
        )
        if reasons is not None:
            if "ConditionalCheckFailed" in reasons:
                raise KeyError(run.run_id)
            raise RuntimeError(f"create_run {run.run_id}: transaction cancelled ({reasons})")

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None."""
        item = self._get(_run_key(run_id))
        return _run(item) if item else None

    def list_runs(
        self, limit: int = 50, states: Collection[RunState] | None = None
    ) -> list[RunRecord]:
        """Newest first, from ``gsi1`` (eventually consistent: a run created a
        moment ago may be missing), then the runs themselves."""
        params: Item = {
            "IndexName": "gsi1",
            "KeyConditionExpression": "gsi1pk = :runs",
            "ExpressionAttributeValues": {":runs": {"S": "RUNS"}},
            "ScanIndexForward": False,
        }
        if states is not None:
            if not states:
                return []
            _filter_states(params, states)
        keys: list[Item] = []
        for entry in self._query(**params):
            keys.append(_key(entry["pk"]["S"], entry["sk"]["S"]))
            if len(keys) >= limit:
                break
        found = {item["pk"]["S"]: _run(item) for item in self._batch_get_full(keys)}
        ordered = [found[k["pk"]["S"]] for k in keys if k["pk"]["S"] in found]
        if states is not None:  # the index may lag a state change
            ordered = [r for r in ordered if r.state in states]
        return ordered

    def stop(self, run_id: str, reason: str) -> bool:
        """Record the first reason the run stopped; whether this call recorded it.
        Not once the run is finalizing or ended (see the local ledger's)."""
        e = _Expr().set("stop_reason", reason)
        e.where(f"attribute_exists({e.n('pk')})")
        e.where(f"attribute_not_exists({e.n('stop_reason')})")
        e.where(f"{e.n('state')} = {e.v(RunState.RUNNING.value)}")
        return self._update(e, _run_key(run_id)) is not None

    def begin_finalize(self, run_id: str, now: float, stale_after: float) -> bool:
        """Move a drained run to ``finalizing``; true for the one caller that did."""
        e = _Expr().set("state", RunState.FINALIZING.value).set("finalize_at", now)
        e.set("updated_at", now)
        state, at = e.n("state"), e.n("finalize_at")
        e.where(f"{e.n('outstanding')} = {e.v(0)}")
        e.where(
            f"{state} = {e.v(RunState.RUNNING.value)} OR ({state} ="
            f" {e.v(RunState.FINALIZING.value)} AND {at} < {e.v(now - stale_after)})"
        )
        return self._update(e, _run_key(run_id)) is not None

    def finish(
        self,
        run_id: str,
        state: RunState,
        manifest_key: str,
        now: float,
        began: float | None = None,
    ) -> bool:
        """Record the final state, unless the run was reopened meanwhile or
        another finalizer took it over (``began``)."""
        e = _Expr().set("state", state.value).set("manifest_key", manifest_key)
        e.set("finished_at", now).set("updated_at", now)
        e.where(f"{e.n('state')} = {e.v(RunState.FINALIZING.value)}")
        e.where(f"{e.n('outstanding')} = {e.v(0)}")
        if began is not None:
            e.where(f"{e.n('finalize_at')} = {e.v(began)}")
        return self._update(e, _run_key(run_id)) is not None

    # -- registration ----------------------------------------------------------------

    # -- claim ---------------------------------------------------------------------------

    def claim(
        self, key: TaskKey, token: str, lease_seconds: float, max_attempts: int, now: float
    ) -> Claim:
        """Lease the task for one attempt, or say why not (see :class:`ClaimOutcome`).

        Optimistic: read the task (and its run, and its parent), decide, and
        write conditionally on the task's version; if another step changed the
        task in between, read again and decide again."""
        for _ in range(RETRIES):
            claim = self._try_claim(key, token, lease_seconds, max_attempts, now)
            if claim is not None:
                return claim
        # Still contended after many rounds: let the message come back later.
        return Claim(ClaimOutcome.BUSY, retry_after=CONTENDED_RETRY_AFTER)

    def _try_claim(
        self, key: TaskKey, token: str, lease_seconds: float, max_attempts: int, now: float
    ) -> Claim | None:
        """One round of :meth:`claim`; None if the task changed under it."""
        found = self._batch_get_full([_task_key(key), _run_key(key.run_id)])
        items = {item["sk"]["S"]: item for item in found}
        item = items.get(_task_sk(key.chunk_id, key.seq))
        if item is None:
            return Claim(ClaimOutcome.MISSING)
        task = _task(item)
        version = int(item["ver"]["N"])
        run = items.get(_RUN_SK)
        parent = None
        if "parent_chunk" in item and task.state not in FINISHED_TASK_STATES:
            pkey = TaskKey(key.run_id, item["parent_chunk"]["S"], _int(item, "parent_seq"))
            found_parent = self._get(_task_key(pkey), ["state", "committed_by", "lease_expires"])
            if found_parent is not None:
                parent = ParentFacts(
                    TaskState(found_parent["state"]["S"]),
                    found_parent.get("committed_by", {}).get("S"),
                    float(_py(found_parent["lease_expires"])),
                )
        stopped = run is not None and "S" in run.get("stop_reason", {})
        facts = ClaimFacts(task, item.get("spawned_by", {}).get("S"), parent, stopped)
        ruling = rule_claim(facts, max_attempts, now)
        answer = claim_without_write(ruling, task)
        if answer is not None:
            return answer
        verdict = ruling.verdict
        if verdict is ClaimVerdict.ORPHANED:
            return self._cancel_at_claim(key, task, version, now, TaskEvent.ORPHANED)
        if verdict is ClaimVerdict.STOPPED:
            stop = run["stop_reason"]["S"] if run is not None else None
            return self._cancel_at_claim(key, task, version, now, TaskEvent.CANCELLED, stop)
        attempt = attempt_in_budget(task)
        e = _Expr()
        e.where(_is_version(e, version)).bump()
        takeover = None
        if verdict in (ClaimVerdict.TAKE_OVER, ClaimVerdict.BURY):
            takeover = FailureKind.CRASHED
            crashed = history_event(FailureKind.CRASHED, now, attempt)
            if verdict is ClaimVerdict.BURY:
                failure = CRASHED_LAST
                e.set("error", f"{failure.kind}: {failure.error}").set("traceback", "")
                e.set("state", TaskState.DEAD.value).remove("lease_token").set("updated_at", now)
                e.append("history", crashed, history_event(TaskEvent.DEAD, now, attempt))
                entries = [
                    {"Update": e.update(self.table, _task_key(key))},
                    self._run_counters(key.run_id, now, retries=1, outstanding=-1, tasks_dead=1),
                ]
                if self._transact(entries) is not None:
                    return None
                return Claim(
                    ClaimOutcome.BURIED, takeover=takeover, drained=self._drained(key.run_id)
                )
            e.append("history", crashed)
            task.history.append(crashed)
        e.set("state", TaskState.RUNNING.value).add("attempt", 1).set("lease_token", token)
        e.set("lease_expires", now + lease_seconds).set("updated_at", now)
        if takeover:
            entries = [
                {"Update": e.update(self.table, _task_key(key))},
                self._run_counters(key.run_id, now, retries=1),
            ]
            if self._transact(entries) is not None:
                return None
        elif self._update(e, _task_key(key)) is None:
            return None
        task.state, task.attempt, task.lease_token = TaskState.RUNNING, task.attempt + 1, token
        task.lease_expires, task.updated_at = now + lease_seconds, now
        return Claim(ClaimOutcome.CLAIMED, task=task, attempt=attempt + 1, takeover=takeover)

    def _cancel_at_claim(
        self,
        key: TaskKey,
        task: TaskRecord,
        version: int,
        now: float,
        outcome: TaskEvent,
        stop: str | None = None,
    ) -> Claim | None:
        """Cancel the task at its claim: an orphan, or a task of a run
        stopped for ``stop``."""
        e = _Expr()
        e.where(_is_version(e, version)).bump()
        e.set("state", TaskState.CANCELLED.value).remove("lease_token").set("updated_at", now)
        attempt = attempt_in_budget(task)
        event = (
            cancel_event(stop, now, attempt)
            if outcome is TaskEvent.CANCELLED
            else history_event(outcome, now, attempt)
        )
        e.append("history", event)
        entries = [
            {"Update": e.update(self.table, _task_key(key))},
            self._run_counters(key.run_id, now, outstanding=-1, tasks_cancelled=1),
        ]
        if self._transact(entries) is not None:
            return None
        return Claim(ClaimOutcome.CANCELLED, drained=self._drained(key.run_id))

    # -- settling ------------------------------------------------------------------------

    def _leased(self, key: TaskKey, token: str) -> TaskRecord | None:
        """The task if ``token`` holds its lease now (to stamp history with the attempt)."""
        item = self._get(_task_key(key))
        if item is None:
            return None
        task = _task(item)
        if task.state != TaskState.RUNNING or task.lease_token != token:
            return None
        return task

    def commit(
        self,
        key: TaskKey,
        token: str,
        output: Output | None,
        outcome: TaskEvent,
        now: float,
        stats: Mapping[str, int] | None = None,
        duration: float | None = None,
        stop_reason: str | None = None,
    ) -> Settle:
        """Mark the task done with its output, if the lease is still ours, cancel
        the orphans an earlier attempt registered and stop the run for
        ``stop_reason`` (unless stopped: then tried again without), in one transaction.

        Orphans are found on ``gsi2``, which is eventually consistent, and only
        for a task that had an earlier attempt (a first attempt has no one else's
        children). The earlier attempt's registrations are at least a lease (or
        a back-off) old by then, far longer than the index lags.
        """
        counted = True  # the stats go in, until the run's item has no room for them
        stopping = bool(stop_reason)  # until the run is found stopped already
        for _ in range(RETRIES):
            task = self._leased(key, token)
            if task is None:
                return Settle(ok=False)
            orphans = self._orphans(key, token) if may_have_orphans(task.attempt) else []
            # More orphans than one transaction holds: cancel the excess first,
            # each batch guarded by our lease (so a stale attempt cannot cancel
            # the children of the attempt that took over) and with its own
            # counter update; a crash after some leaves a state the next attempt
            # repairs (it revives what it registers, and commits the rest).
            head, rest = orphans[: MAX_TRANSACTION_ITEMS - 2], orphans[MAX_TRANSACTION_ITEMS - 2 :]
            lost = False
            while rest:
                part, rest = rest[: MAX_TRANSACTION_ITEMS - 2], rest[MAX_TRANSACTION_ITEMS - 2 :]
                guard = _Expr()
                guard.where(_is_token(guard, token))
                entries = [
                    {"ConditionCheck": guard.check(self.table, _task_key(key))},
                    *(self._orphan_entry(o, token, now) for o in part),
                    self._run_counters(
                        key.run_id, now, outstanding=-len(part), tasks_cancelled=len(part)
                    ),
                ]
                reasons = self._transact(entries)
                if reasons is not None:
                    lost = True
                    break
            if lost:
                continue  # our lease is gone (re-read says so) or an orphan changed
            e = _Expr().set("state", TaskState.DONE.value).set("committed_by", token)
            e.remove("lease_token").set("updated_at", now).bump()
            e.set("output_key", output.key if output else None)
            e.set("records", output.records if output else 0)
            e.set("bytes", output.bytes if output else 0)
            records = output.records if output else 0
            attempt = attempt_in_budget(task)
            took = took_field(duration)
            e.append("history", history_event(outcome, now, attempt, records=records, **took))
            e.where(_is_token(e, token))
            run = self._run_commit(
                key.run_id,
                now,
                stop_reason if stopping else None,
                outstanding=-1 - len(head),
                tasks_done=1,
                tasks_cancelled=len(head),
                records=records,
                bytes=output.bytes if output else 0,
            )
            own, domains = split_stats(stats or {}) if counted else ({}, {})
            names = list(own)
            if names:
                _sum_stats(run["Update"], {n: own[n] for n in names[:STATS_IN_COMMIT]})
            entries = [
                {"Update": e.update(self.table, _task_key(key))},
                *(self._orphan_entry(o, token, now) for o in head),
                run,
            ]
            # A crawl's per-domain counters, on items of their own, and the run's
            # counters past the budget (ledger_stats): what the transaction has
            # no room for is added once it committed.
            by_domain = self._domain_entries(key.run_id, domains)
            room = MAX_TRANSACTION_ITEMS - len(entries)
            entries += by_domain[:room]
            reasons = self._transact(entries)
            if reasons is not None and counted and reasons[entries.index(run)] == "ValidationError":
                # The run's item is at DynamoDB's 400 KB (counters by tens of
                # thousands of names): the chunk's data commits, its counters
                # cannot. Losing them beats a run no chunk of which can commit.
                log.warning("task %s: its stats not counted: the run's record is full", key)
                counted = False
                continue
            if stopping and reasons and reasons[entries.index(run)] == "ConditionalCheckFailed":
                stopping = False  # stopped already (or gone: then the retry fails too)
                continue
            if reasons is None:
                rest = self._run_stats_entries(
                    key.run_id, {n: own[n] for n in names[STATS_IN_COMMIT:]}
                )
                step = MAX_TRANSACTION_ITEMS - 1
                later = [by_domain[i : i + step] for i in range(room, len(by_domain), step)]
                if later or rest:
                    self._add_after_commit(key, token, later + [[entry] for entry in rest])
                return Settle(ok=True, drained=self._drained(key.run_id), stopped=stopping)
        raise RuntimeError(f"commit {key}: too much contention")

    def retry(
        self, key: TaskKey, token: str, failure: Failure, not_before: float, now: float
    ) -> bool:
        """Give the lease back after a failed attempt; no claim before ``not_before``."""
        task = self._leased(key, token)
        if task is None:
            return False
        e = _Expr().set("state", TaskState.QUEUED.value).remove("lease_token")
        e.set("lease_expires", 0).set("not_before", not_before).set("error", failure.error)
        e.set("traceback", failure.traceback).set("updated_at", now).bump()
        e.append("history", _failed(failure, now, attempt_in_budget(task)))
        spent = spends_attempt(failure.kind)
        if not spent:
            e.add("attempt_floor", 1)  # an interrupted attempt is not counted
        e.where(_is_token(e, token))
        entries = [{"Update": e.update(self.table, _task_key(key))}]
        if spent:
            entries.append(self._run_counters(key.run_id, now, retries=1))
        return self._transact(entries) is None

    def bury(self, key: TaskKey, token: str, failure: Failure, now: float) -> Settle:
        """Dead-letter the task if the lease is still ours."""
        task = self._leased(key, token)
        if task is None:
            return Settle(ok=False)
        attempt = attempt_in_budget(task)
        e = _Expr().set("state", TaskState.DEAD.value).remove("lease_token").bump()
        e.set("error", f"{failure.kind}: {failure.error}").set("traceback", failure.traceback)
        e.set("updated_at", now).append(
            "history",
            _failed(failure, now, attempt),
            history_event(TaskEvent.DEAD, now, attempt),
        )
        e.where(_is_token(e, token))
        entries = [
            {"Update": e.update(self.table, _task_key(key))},
            self._run_counters(key.run_id, now, outstanding=-1, tasks_dead=1),
        ]
        if self._transact(entries) is not None:
            return Settle(ok=False)
        return Settle(ok=True, drained=self._drained(key.run_id))

    # -- reads -----------------------------------------------------------------------------

    def queued_children(self, key: TaskKey) -> list[TaskRecord]:
        """Still-queued tasks registered by ``key``: their keys from ``gsi2``,
        then the tasks themselves (consistent reads), checked again."""
        keys = [
            _key(entry["pk"]["S"], entry["sk"]["S"])
            for entry in self._query(
                IndexName="gsi2",
                KeyConditionExpression="gsi2pk = :kids",
                FilterExpression="#state = :queued",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":kids": {"S": _kids_key(key.run_id, key.chunk_id, key.seq)},
                    ":queued": {"S": TaskState.QUEUED.value},
                },
            )
        ]
        tasks = [_task(item) for item in self._batch_get_full(keys)]
        tasks = [t for t in tasks if t.state == TaskState.QUEUED]
        tasks.sort(key=chunk_order)
        return tasks

    def get_task(self, key: TaskKey) -> TaskRecord | None:
        """The task, or None."""
        item = self._get(_task_key(key))
        return _task(item) if item else None

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()


def _failed(failure: Failure, now: float, attempt: int) -> dict[str, object]:
    """The history event of a failed attempt, with its run time when known."""
    took = took_field(failure.duration)
    return history_event(failure.kind, now, attempt, error=failure.error, **took)
