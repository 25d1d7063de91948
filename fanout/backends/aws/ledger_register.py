"""Registering tasks on DynamoDB: conditional creates of children (or taking
over an earlier attempt's), checked against the parent's lease and counted
into the run, in transactions of at most 100 items."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fanout.backends.aws.ledger_items import (
    MAX_TRANSACTION_ITEMS,
    DynamoTable,
    Item,
    _av,
    _Expr,
    _int,
    _is_token,
    _is_version,
    _key,
    _kids_key,
    _run_key,
    _run_pk,
    _task_key,
    _task_sk,
)
from fanout.backends.base import (
    NewTask,
    Registration,
    TaskEvent,
    TaskKey,
    TaskState,
)
from fanout.backends.rules import history_event

#: Bytes per transaction we stay under (DynamoDB's limit is 4 MB).
MAX_TRANSACTION_BYTES = 3_500_000
#: Attempts of an optimistic read-decide-write step before giving up.
RETRIES = 16


@dataclass
class _Op:
    """One task write of a registration."""

    task: NewTask
    item: Item  # the transaction entry
    created: int  # 1 if it counts as a new task (a create or a revival)
    new_chunk: bool  # a create at seq 0 (what chunks_total and max_chunks count)
    revived: bool
    size: int


class Registrar(DynamoTable):
    """The registration half of :class:`~fanout.backends.aws.ledger.DynamoLedger`."""

    def _run_counters(
        self, run_id: str, now: float, chunks_below: int | None = None, **counters: int
    ) -> Item:
        """A transaction entry moving the run's counters (if the run exists and,
        given ``chunks_below``, its ``chunks_total`` is at most that before)."""
        e = self._counters(now, chunks_below, **counters)
        return {"Update": e.update(self.table, _run_key(run_id))}

    def _run_commit(
        self, run_id: str, now: float, stop_reason: str | None, **counters: int
    ) -> Item:
        """:meth:`_run_counters` for a commit, which also stops the run for
        ``stop_reason`` if given (and the run is not stopped: else it fails)."""
        e = self._counters(now, None, **counters)
        if stop_reason is not None:
            e.set("stop_reason", stop_reason)
            e.where(f"attribute_not_exists({e.n('stop_reason')})")
        return {"Update": e.update(self.table, _run_key(run_id))}

    @staticmethod
    def _counters(now: float, chunks_below: int | None, **counters: int) -> _Expr:
        e = _Expr().set("updated_at", now)
        for name, amount in counters.items():
            e.add(name, amount)
        e.where(f"attribute_exists({e.n('pk')})")
        if chunks_below is not None:
            e.where(f"{e.n('chunks_total')} <= {e.v(chunks_below)}")
        return e

    def _new_task(self, run_id: str, t: NewTask, now: float, spawned_by: str | None) -> Item:
        item: Item = {
            **_key(_run_pk(run_id), _task_sk(t.chunk_id, t.seq)),
            "run_id": {"S": run_id},
            "chunk_id": {"S": t.chunk_id},
            "seq": _av(t.seq),
            "state": {"S": TaskState.QUEUED.value},
            "attempt": _av(0),
            "attempt_floor": _av(0),
            "depth": _av(t.depth),
            "message": {"S": t.message},
            "lease_expires": _av(0),
            "not_before": _av(t.not_before),
            "history": {"L": []},
            "updated_at": _av(now),
            "parent_seq": _av(t.parent_seq),
            "ver": _av(0),
        }
        if t.parent_chunk is not None:
            item["parent_chunk"] = {"S": t.parent_chunk}
            item["gsi2pk"] = {"S": _kids_key(run_id, t.parent_chunk, t.parent_seq)}
            item["gsi2sk"] = {"S": item["sk"]["S"]}
        if spawned_by is not None:
            item["spawned_by"] = {"S": spawned_by}
        return item

    def _plan(
        self, run_id: str, tasks: Sequence[NewTask], now: float, spawned_by: str | None
    ) -> list[_Op]:
        """Decide, from a consistent read, what registering ``tasks`` writes:
        a conditional create for each missing task; with ``spawned_by``, a
        take-over of those an earlier attempt of the parent left queued and a
        revival of those cancelled as its orphans."""
        pk = _run_pk(run_id)
        existing = self._batch_get(
            [_key(pk, _task_sk(t.chunk_id, t.seq)) for t in tasks],
            ["state", "spawned_by", "ver", "attempt", "attempt_floor"],
        )
        ops: list[_Op] = []
        for t in tasks:
            sk = _task_sk(t.chunk_id, t.seq)
            size = len(t.message) + 1024
            old = existing.get(sk)
            if old is None:
                put = {
                    "TableName": self.table,
                    "Item": self._new_task(run_id, t, now, spawned_by),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
                ops.append(_Op(t, {"Put": put}, 1, t.seq == 0, False, size))
                continue
            old_by = old.get("spawned_by", {}).get("S")
            if spawned_by is None or old_by == spawned_by:
                continue  # already registered, by this very attempt or for good
            state, version = old["state"]["S"], int(old["ver"]["N"])
            e = _Expr().set("message", t.message).set("spawned_by", spawned_by)
            e.set("updated_at", now).bump().where(_is_version(e, version))
            if state == TaskState.QUEUED:
                # An earlier attempt of the parent registered it and never
                # committed: this attempt's version replaces theirs while it waits.
                ops.append(
                    _Op(t, {"Update": e.update(self.table, _key(pk, sk))}, 0, False, False, size)
                )
            elif state == TaskState.CANCELLED:
                # ...and comes back if it was cancelled as an orphan meanwhile.
                attempt = int(old["attempt"]["N"]) - int(old["attempt_floor"]["N"])
                e.set("state", TaskState.QUEUED.value).append(
                    "history", history_event(TaskEvent.REVIVED, now, attempt)
                )
                ops.append(
                    _Op(t, {"Update": e.update(self.table, _key(pk, sk))}, 1, False, True, size)
                )
        return ops

    @staticmethod
    def _batches(ops: list[_Op], room: int) -> list[list[_Op]]:
        """Split into transactions of at most ``room`` task writes (and 3.5 MB)."""
        batches: list[list[_Op]] = [[]]
        size = 0
        for op in ops:
            batch = batches[-1]
            if batch and (len(batch) >= room or size + op.size > MAX_TRANSACTION_BYTES):
                batches.append([])
                size = 0
            batches[-1].append(op)
            size += op.size
        return batches

    def _lease_checks(self, run_id: str, tasks: Sequence[NewTask], token: str) -> list[Item]:
        """Transaction entries requiring ``token`` to hold the lease of every parent."""
        checks = []
        for parent_chunk, parent_seq in sorted(
            {(t.parent_chunk or "", t.parent_seq) for t in tasks}
        ):
            e = _Expr()
            e.where(_is_token(e, token))
            # A parentless task has no lease to hold: its check (on a task that
            # cannot exist) fails, as the SQLite ledger's lookup finds nothing.
            checks.append(
                {
                    "ConditionCheck": e.check(
                        self.table, _task_key(TaskKey(run_id, parent_chunk, parent_seq))
                    )
                }
            )
        return checks

    def register(
        self,
        run_id: str,
        tasks: Sequence[NewTask],
        max_chunks: int,
        spawned_by: str | None = None,
    ) -> Registration:
        """Create the tasks not yet registered and count them.

        With ``spawned_by``, every transaction also checks that this token
        still holds the lease of the tasks' parent(s), else nothing of it is
        written (``lease_lost``).

        Up to ~98 tasks (and 3.5 MB of messages) go in one transaction with the
        run's counters: all or nothing. A larger registration is split, and
        only its first transaction checks ``max_chunks``, reserving room for
        every new chunk of the whole registration; so "over the limit" still
        registers nothing. Each later transaction raises ``outstanding`` and
        ``tasks_total`` by exactly the tasks it created (and gives back the
        chunk slots of tasks someone else created meanwhile), so the counters
        are exact whenever a transaction ends. A crash, or a lost lease, between
        transactions leaves part of the children registered and counted: they
        belong to an attempt that never commits, so they are orphans, which the
        attempt that commits cancels (or takes over). What is lost is only the
        all-at-once visibility, and slots reserved for tasks never written.
        """
        if not tasks:
            return Registration(created=0)
        now = time.time()
        unique = list({(t.chunk_id, t.seq): t for t in reversed(tasks)}.values())[::-1]
        checks = self._lease_checks(run_id, unique, spawned_by) if spawned_by else []
        room = MAX_TRANSACTION_ITEMS - 1 - len(checks)
        for _ in range(RETRIES):
            ops = self._plan(run_id, unique, now, spawned_by)
            if not ops:
                return self._register_nothing(run_id, max_chunks, checks)
            batches = self._batches(ops, room)
            reserve = sum(op.new_chunk for op in ops)
            first = batches[0]
            counters = self._run_counters(
                run_id,
                now,
                chunks_below=max_chunks - reserve,
                **self._counts(first),
                chunks_total=reserve,
            )
            reasons = self._transact([op.item for op in first] + checks + [counters])
            if reasons is None:
                break
            failed = [i for i, r in enumerate(reasons) if r == "ConditionalCheckFailed"]
            if any(len(first) <= i < len(first) + len(checks) for i in failed):
                return Registration(created=0, lease_lost=True)
            if failed == [len(reasons) - 1]:
                # Only the run's condition failed: no such run, or over the limit.
                if self._get(_run_key(run_id), ["pk"]) is None:
                    raise KeyError(run_id)
                return Registration(created=0, over_limit=True)
            # Another registration of the same tasks raced this one: decide again.
        else:
            raise RuntimeError(f"register in {run_id}: too much contention")
        created = sum(op.created for op in first)
        rest = batches[1:]
        while rest:
            batch = rest.pop(0)
            more = self._register_more(run_id, batch, now, spawned_by, checks)
            if more is None:
                # The lease was lost part way: give back the slots reserved for the rest.
                unused = sum(op.new_chunk for b in [batch, *rest] for op in b)
                self._run_update(run_id, now, chunks_total=-unused)
                return Registration(created=created, lease_lost=True)
            created += more
        return Registration(created=created)

    def _register_nothing(
        self, run_id: str, max_chunks: int, checks: Sequence[Item]
    ) -> Registration:
        """The answer when every task is registered already (nothing to write)."""
        if checks:
            # The same check as a write would make, as one transaction of checks.
            reasons = self._transact(list(checks))
            if reasons is not None:
                return Registration(created=0, lease_lost=True)
        run = self._get(_run_key(run_id), ["chunks_total"])
        if run is None:
            raise KeyError(run_id)
        return Registration(created=0, over_limit=int(run["chunks_total"]["N"]) > max_chunks)

    def _run_update(self, run_id: str, now: float, **counters: int) -> None:
        if any(counters.values()):
            self.client.update_item(**self._run_counters(run_id, now, **counters)["Update"])

    @staticmethod
    def _counts(ops: Sequence[_Op]) -> dict[str, int]:
        created = sum(op.created for op in ops)
        revived = sum(op.revived for op in ops)
        return {"outstanding": created, "tasks_total": created, "tasks_cancelled": -revived}

    def _register_more(
        self,
        run_id: str,
        batch: list[_Op],
        now: float,
        spawned_by: str | None,
        checks: Sequence[Item],
    ) -> int | None:
        """A later transaction of a split registration: how many it created, or
        None if the lease was lost. Its chunk slots are reserved already, and
        given back for tasks someone else created meanwhile."""
        reserved = sum(op.new_chunk for op in batch)
        tasks = [op.task for op in batch]
        for _ in range(RETRIES):
            if not batch:
                self._run_update(run_id, now, chunks_total=-reserved)
                return 0
            release = reserved - sum(op.new_chunk for op in batch)
            counters = self._run_counters(run_id, now, **self._counts(batch), chunks_total=-release)
            reasons = self._transact([op.item for op in batch] + list(checks) + [counters])
            if reasons is None:
                return sum(op.created for op in batch)
            if "ConditionalCheckFailed" in reasons[len(batch) : len(batch) + len(checks)]:
                return None
            batch = self._plan(run_id, tasks, now, spawned_by)
        raise RuntimeError(f"register in {run_id}: too much contention")

    def _orphans(self, key: TaskKey, token: str) -> list[Item]:
        """Queued children of ``key`` that ``token``'s attempt did not register."""
        return [
            entry
            for entry in self._query(
                IndexName="gsi2",
                KeyConditionExpression="gsi2pk = :kids",
                ExpressionAttributeValues={
                    ":kids": {"S": _kids_key(key.run_id, key.chunk_id, key.seq)}
                },
            )
            if entry.get("state", {}).get("S") == TaskState.QUEUED
            and entry.get("spawned_by", {}).get("S") != token
        ]

    def _orphan_entry(self, entry: Item, token: str, now: float) -> Item:
        """A transaction entry cancelling one orphan, if it is still one."""
        e = _Expr().set("state", TaskState.CANCELLED.value).set("updated_at", now).bump()
        attempt = _int(entry, "attempt") - _int(entry, "attempt_floor")
        e.append("history", history_event(TaskEvent.ORPHANED, now, attempt))
        by = e.n("spawned_by")
        e.where(f"{e.n('state')} = {e.v(TaskState.QUEUED.value)}")
        e.where(f"attribute_not_exists({by}) OR {by} <> {e.v(token)}")
        return {"Update": e.update(self.table, _key(entry["pk"]["S"], entry["sk"]["S"]))}
