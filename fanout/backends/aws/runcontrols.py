"""Run controls on DynamoDB (mixed into :class:`~fanout.backends.aws.ledger.DynamoLedger`).

A run's control state is one item, ``RUN#<run> / CONTROL``, holding the state
as JSON and a version: a change reads it, applies the rule of
:mod:`fanout.controls` and writes it back conditional on the version read
(again, on a fresh read, when another writer came first), as the crawl's
domain leases do. Only runs that use a control pay for it: a run with no
``max_concurrency`` costs one read of a missing item per chunk.

Cancelling a run's queued tasks is one transaction per 99 tasks, each task
conditional on still being queued, with the run's counters in the same
transaction, so the outstanding counter stays exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError

from fanout.backends.aws.ledger_items import (
    MAX_TRANSACTION_ITEMS,
    DynamoTable,
    Item,
    _Expr,
    _int,
    _key,
    _run_key,
    _run_pk,
)
from fanout.backends.base import TaskState
from fanout.backends.rules import cancel_event
from fanout.backends.runcontrols import ControlContended, ControlState
from fanout.retry import JITTER

T = TypeVar("T")

#: Optimistic rounds before a change gives up (each lost one means another
#: writer changed the item in between).
_TRIES = 20
#: The longest pause (s) between two rounds. Rounds back off with full jitter
#: (up to 10 ms after the first lost round, doubling), so writers that collided
#: spread out instead of colliding again in lockstep; 20 rounds wait at most
#: about 3 s in all.
_MAX_PAUSE = 0.2


class DynamoRunControls(DynamoTable):
    """The :class:`~fanout.backends.runcontrols.RunControls` of the DynamoDB ledger."""

    @staticmethod
    def _control_key(run_id: str) -> Item:
        return _key(_run_pk(run_id), "CONTROL")

    def read_control(self, run_id: str) -> ControlState:
        """The run's control state (``{}`` if never set): one consistent read."""
        item = self._get(self._control_key(run_id), ["control"])
        state: ControlState = json.loads(item["control"]["S"]) if item else {}
        return state

    def change_control(self, run_id: str, change: Callable[[ControlState], T]) -> T:
        """Read, apply ``change``, write back conditional on the version read."""
        key = self._control_key(run_id)
        for round_ in range(_TRIES):
            if round_:
                time.sleep(JITTER.uniform(0, min(_MAX_PAUSE, 0.005 * 2**round_)))
            item = self._get(key, ["control", "ver"])
            state: ControlState = json.loads(item["control"]["S"]) if item else {}
            version = _int(item, "ver") if item else 0
            result = change(state)
            body = json.dumps(state, separators=(",", ":"), sort_keys=True)
            params: Item = {
                "TableName": self.table,
                "Item": {**key, "control": {"S": body}, "ver": {"N": str(version + 1)}},
            }
            if item is None:
                params["ConditionExpression"] = "attribute_not_exists(pk)"
            else:
                params["ConditionExpression"] = "ver = :v"
                params["ExpressionAttributeValues"] = {":v": {"N": str(version)}}
            try:
                self.client.put_item(**params)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                    continue
                raise
            return result
        raise ControlContended(
            f"run {run_id}: its control state changed under every one of {_TRIES} tries"
        )

    def cancel_queued(self, run_id: str, now: float) -> tuple[int, bool]:
        """Cancel the run's queued tasks, 99 to a transaction with the run's
        counters, each conditional on the run's stop being the one read: a
        replay that cleared it meanwhile keeps its tasks queued."""
        cancelled = 0
        for _ in range(_TRIES):
            run = self._get(_run_key(run_id), ["stop_reason"])
            stop = run["stop_reason"]["S"] if run is not None and "stop_reason" in run else None
            if stop is None:
                break  # not stopped (any more): nothing of it to cancel
            queued = list(
                self._query(
                    KeyConditionExpression="pk = :pk AND begins_with(sk, :task)",
                    FilterExpression="#state = :queued",
                    ProjectionExpression="pk, sk, attempt, attempt_floor",
                    ExpressionAttributeNames={"#state": "state"},
                    ExpressionAttributeValues={
                        ":pk": {"S": _run_pk(run_id)},
                        ":task": {"S": "TASK#"},
                        ":queued": {"S": TaskState.QUEUED.value},
                    },
                    ConsistentRead=True,
                )
            )
            if not queued:
                break
            clean = True
            for start in range(0, len(queued), MAX_TRANSACTION_ITEMS - 1):
                part = queued[start : start + MAX_TRANSACTION_ITEMS - 1]
                entries = [self._cancel_entry(item, stop, now) for item in part]
                e = _Expr().set("updated_at", now)
                e.add("outstanding", -len(part)).add("tasks_cancelled", len(part))
                e.where(f"{e.n('stop_reason')} = {e.v(stop)}")
                entries.append({"Update": e.update(self.table, _run_key(run_id))})
                if self._transact(entries) is None:
                    cancelled += len(part)
                else:
                    clean = False  # a task or the stop changed meanwhile: read again
                    break
            if clean:
                break
        item = self._get(_run_key(run_id), ["outstanding"])
        return cancelled, item is not None and _int(item, "outstanding") == 0

    def _cancel_entry(self, item: Item, stop: str, now: float) -> Item:
        """A transaction entry cancelling one task for the run's ``stop``, if
        it is still queued."""
        attempt = _int(item, "attempt") - _int(item, "attempt_floor")
        e = _Expr().set("state", TaskState.CANCELLED.value).remove("lease_token")
        event = cancel_event(stop, now, attempt)
        e.set("updated_at", now).append("history", event).bump()
        e.where(f"{e.n('state')} = {e.v(TaskState.QUEUED.value)}")
        return {"Update": e.update(self.table, _key(item["pk"]["S"], item["sk"]["S"]))}
