"""Listing a run's tasks and replaying them on DynamoDB: dead tasks (and the
tasks a stop cancelled) back to queued, with the run's counters, in
transactions of at most 100 items."""

from __future__ import annotations

from collections.abc import Collection

from fanout.backends.aws.ledger_items import (
    MAX_TRANSACTION_ITEMS,
    DynamoTable,
    Item,
    _Expr,
    _filter_states,
    _run_key,
    _run_pk,
    _task,
    _task_key,
)
from fanout.backends.aws.ledger_register import RETRIES
from fanout.backends.base import RunState, TaskEvent, TaskRecord, TaskState
from fanout.backends.rules import (
    attempt_in_budget,
    chunk_order,
    finalizing_refusal,
    history_event,
    may_reopen,
    replay_revives,
)
from fanout.errors import RunFinalizingError


class Reopener(DynamoTable):
    """The listing and replay half of :class:`~fanout.backends.aws.ledger.DynamoLedger`."""

    def list_tasks(
        self, run_id: str, states: Collection[TaskState] | None = None, *, history: bool = True
    ) -> list[TaskRecord]:
        """The run's tasks in chunk order (a strongly consistent query of the run)."""
        params: Item = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :task)",
            "ExpressionAttributeValues": {
                ":pk": {"S": _run_pk(run_id)},
                ":task": {"S": "TASK#"},
            },
            "ConsistentRead": True,
        }
        if states is not None:
            if not states:
                return []
            _filter_states(params, states)
        tasks = [_task(item, history) for item in self._query(**params)]
        tasks.sort(key=chunk_order)
        return tasks

    def reopen(
        self, run_id: str, chunk_ids: Collection[str] | None, now: float
    ) -> list[TaskRecord]:
        """Dead tasks (and those a stop cancelled: see
        :func:`~fanout.backends.rules.replay_revives`) back to queued with a
        fresh attempt budget; the run reopens, its stop cleared.

        The tasks are listed once and put back 99 to a transaction, with the
        run's counters, so the counters are exact after each. The first
        transaction clears the stop, on condition that it is still the one
        read (and the run not finalizing: refused, :class:`RunFinalizingError`,
        if the read says it is); the later ones, that no stop came since. A
        task changed meanwhile makes it list them again; a stop that came
        meanwhile (a cancel) ends the replay with what it put back, which that
        stop has cancelled again. A crash between transactions leaves the rest
        dead or cancelled, for the replay to be run again."""
        reopened: list[TaskRecord] = []
        expected: str | None = None  # the stop the next transaction expects
        for round_ in range(RETRIES):
            run = self._get(_run_key(run_id), ["state", "stop_reason"])
            if run is None:
                break
            if not may_reopen(RunState(run["state"]["S"])):
                raise RunFinalizingError(finalizing_refusal(run_id))
            stop = run["stop_reason"]["S"] if "stop_reason" in run else None
            if round_ == 0 or not reopened:
                expected = stop
            elif stop != expected:
                break  # stopped again meanwhile (after the stop this replay cleared)
            todo = [
                t
                for t in self.list_tasks(run_id, (TaskState.DEAD, TaskState.CANCELLED))
                if replay_revives(stop, t)
                and (t.state != TaskState.DEAD or chunk_ids is None or t.chunk_id in chunk_ids)
            ]
            if not self._reopen_all(run_id, todo, expected, now, reopened):
                expected = None if reopened else expected
                continue  # something changed under a transaction: read again
            break
        reopened.sort(key=chunk_order)
        return reopened

    def _reopen_all(
        self,
        run_id: str,
        todo: list[TaskRecord],
        stop: str | None,
        now: float,
        reopened: list[TaskRecord],
    ) -> bool:
        """Put ``todo`` back, 99 tasks to a transaction, appending each batch
        put back to ``reopened``; False at the first transaction refused."""
        for start in range(0, len(todo), MAX_TRANSACTION_ITEMS - 1):
            batch = todo[start : start + MAX_TRANSACTION_ITEMS - 1]
            entries = [self._replayed(t, now) for t in batch]
            entries.append(self._run_reopened(run_id, batch, stop, now))
            if self._transact(entries) is not None:
                return False
            stop = None  # cleared: the later batches expect no stop
            for t in batch:
                event = history_event(TaskEvent.REPLAYED, now, attempt_in_budget(t))
                t.state, t.attempt_floor, t.not_before = TaskState.QUEUED, t.attempt, 0.0
                t.lease_token, t.lease_expires, t.updated_at = None, 0.0, now
                t.history.append(event)
            reopened.extend(batch)
        return True

    def _replayed(self, t: TaskRecord, now: float) -> Item:
        """The transaction entry putting ``t`` back to queued, if it is still dead
        (or cancelled)."""
        e = _Expr().set("state", TaskState.QUEUED.value).set("attempt_floor", t.attempt)
        e.set("not_before", 0).remove("lease_token").set("lease_expires", 0)
        event = history_event(TaskEvent.REPLAYED, now, attempt_in_budget(t))
        e.set("updated_at", now).append("history", event).bump()
        e.where(f"{e.n('state')} = {e.v(t.state.value)}")
        return {"Update": e.update(self.table, _task_key(t.key))}

    def _run_reopened(
        self, run_id: str, batch: list[TaskRecord], stop: str | None, now: float
    ) -> Item:
        """The transaction entry reopening the run for ``batch``: its counters,
        and its stop cleared; conditional on the run's stop still being
        ``stop`` and on the run not finalizing."""
        dead = sum(t.state == TaskState.DEAD for t in batch)
        # A replay runs what the user asked for, even in a run a bound had
        # stopped; the chunks the stop cancelled run with it.
        e = _Expr().set("state", RunState.RUNNING.value).set("updated_at", now)
        e.remove("finished_at").remove("stop_reason")
        e.add("outstanding", len(batch)).add("tasks_dead", -dead)
        e.add("tasks_cancelled", dead - len(batch))
        e.where(f"attribute_exists({e.n('pk')})")
        e.where(f"{e.n('state')} <> {e.v(RunState.FINALIZING.value)}")
        if stop is None:
            e.where(f"attribute_not_exists({e.n('stop_reason')})")
        else:
            e.where(f"{e.n('stop_reason')} = {e.v(stop)}")
        return {"Update": e.update(self.table, _run_key(run_id))}
