"""Items of the DynamoDB ledger: attribute values, keys, expressions and
records (the plumbing of :mod:`fanout.backends.aws.ledger`, kept apart so that
module holds only the ledger's steps)."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client
from fanout.backends.base import (
    Output,
    RunRecord,
    RunState,
    TaskKey,
    TaskRecord,
    TaskState,
)

Item = dict[str, Any]  # a DynamoDB item in the low-level (typed) format

#: DynamoDB's limit on the items of one TransactWriteItems.
MAX_TRANSACTION_ITEMS = 100

_RUN_SK = "RUN"


# -- attribute values ----------------------------------------------------------


def _av(value: object) -> Item:
    """A Python value as a DynamoDB attribute value."""
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, int | float):
        return {"N": repr(value)}
    if isinstance(value, Mapping):
        return {"M": {str(k): _av(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [_av(v) for v in value]}
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def _py(av: Item) -> Any:
    """A DynamoDB attribute value as a Python value."""
    if "S" in av:
        return av["S"]
    if "N" in av:
        text: str = av["N"]
        return float(text) if any(c in text for c in ".eE") else int(text)
    if "M" in av:
        return {k: _py(v) for k, v in av["M"].items()}
    if "L" in av:
        return [_py(v) for v in av["L"]]
    if "BOOL" in av:
        return bool(av["BOOL"])
    return None


def _plain(item: Item) -> dict[str, Any]:
    return {k: _py(v) for k, v in item.items()}


def _run_pk(run_id: str) -> str:
    return f"RUN#{run_id}"


def _task_sk(chunk_id: str, seq: int) -> str:
    return f"TASK#{chunk_id}#{seq:08d}"


def _key(pk: str, sk: str) -> Item:
    return {"pk": {"S": pk}, "sk": {"S": sk}}


def _task_key(key: TaskKey) -> Item:
    return _key(_run_pk(key.run_id), _task_sk(key.chunk_id, key.seq))


def _run_key(run_id: str) -> Item:
    return _key(_run_pk(run_id), _RUN_SK)


def _kids_key(run_id: str, chunk_id: str, seq: int) -> str:
    return f"KIDS#{run_id}#{chunk_id}#{seq}"


class _Expr:
    """Builds one update (or condition) expression with its name and value maps.

    Every attribute goes through a ``#`` alias, so reserved words (``state``,
    ``bytes``) and arbitrary stats names are safe.
    """

    def __init__(self) -> None:
        self.sets: list[str] = []
        self.removes: list[str] = []
        self.adds: list[str] = []
        self.conds: list[str] = []
        self.names: dict[str, str] = {}
        self.values: dict[str, Item] = {}

    def n(self, attr: str) -> str:
        alias = f"#a{len(self.names)}"
        for existing, name in self.names.items():
            if name == attr:
                return existing
        self.names[alias] = attr
        return alias

    def v(self, value: object) -> str:
        alias = f":v{len(self.values)}"
        self.values[alias] = _av(value)
        return alias

    def set(self, attr: str, value: object) -> _Expr:
        self.sets.append(f"{self.n(attr)} = {self.v(value)}")
        return self

    def remove(self, attr: str) -> _Expr:
        self.removes.append(self.n(attr))
        return self

    def add(self, attr: str, amount: int) -> _Expr:
        if amount:
            self.adds.append(f"{self.n(attr)} {self.v(amount)}")
        return self

    def append(self, attr: str, *events: dict[str, object]) -> _Expr:
        n = self.n(attr)
        self.sets.append(f"{n} = list_append({n}, {self.v(list(events))})")
        return self

    def bump(self) -> _Expr:
        """A new version: the optimistic lock of a read-decide-write step."""
        return self.add("ver", 1)

    def where(self, condition: str) -> _Expr:
        self.conds.append(f"({condition})")
        return self

    def update(self, table: str, key: Item) -> Item:
        """The parameters of an ``UpdateItem`` (or of a transaction's ``Update``)."""
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        if self.adds:
            parts.append("ADD " + ", ".join(self.adds))
        params: Item = {"TableName": table, "Key": key, "UpdateExpression": " ".join(parts)}
        return self._finish(params)

    def check(self, table: str, key: Item) -> Item:
        """The parameters of a transaction's ``ConditionCheck``."""
        return self._finish({"TableName": table, "Key": key})

    def _finish(self, params: Item) -> Item:
        if self.conds:
            params["ConditionExpression"] = " AND ".join(self.conds)
        if self.names:
            params["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            params["ExpressionAttributeValues"] = dict(self.values)
        return params


def _is_token(e: _Expr, token: str) -> str:
    """Condition: the task is running under ``token`` (the lease is ours)."""
    return (
        f"{e.n('state')} = {e.v(TaskState.RUNNING.value)} AND {e.n('lease_token')} = {e.v(token)}"
    )


def _is_version(e: _Expr, version: int) -> str:
    return f"{e.n('ver')} = {e.v(version)}"


def _int(item: Item, name: str) -> int:
    value = item.get(name)
    return int(value["N"]) if value and "N" in value else 0


def _run(item: Item) -> RunRecord:
    d = _plain(item)
    return RunRecord(
        run_id=d["run_id"],
        job=d["job"],
        job_name=d["job_name"],
        params=json.loads(d["params"]),
        settings=json.loads(d["settings"]),
        state=RunState(d["state"]),
        stop_reason=d.get("stop_reason"),
        created_at=float(d["created_at"]),
        updated_at=float(d["updated_at"]),
        finished_at=float(d["finished_at"]) if d.get("finished_at") is not None else None,
        outstanding=d["outstanding"],
        tasks_total=d["tasks_total"],
        chunks_total=d["chunks_total"],
        tasks_done=d["tasks_done"],
        tasks_dead=d["tasks_dead"],
        tasks_cancelled=d["tasks_cancelled"],
        records=d["records"],
        bytes=d["bytes"],
        retries=d["retries"],
        manifest_key=d.get("manifest_key"),
        stats={str(k): int(v) for k, v in d["stats"].items()},
        finalize_at=float(d["finalize_at"]) if d.get("finalize_at") is not None else None,
    )


def _task(item: Item, history: bool = True) -> TaskRecord:
    if not history:
        item = {k: v for k, v in item.items() if k != "history"}
    d = _plain(item)
    output = None
    if d.get("output_key") is not None:
        output = Output(d["output_key"], d.get("records") or 0, d.get("bytes") or 0)
    return TaskRecord(
        run_id=d["run_id"],
        chunk_id=d["chunk_id"],
        seq=d["seq"],
        state=TaskState(d["state"]),
        attempt=d["attempt"],
        attempt_floor=d["attempt_floor"],
        depth=d["depth"],
        message=d["message"],
        lease_token=d.get("lease_token"),
        lease_expires=float(d["lease_expires"]),
        not_before=float(d["not_before"]),
        output=output,
        error=d.get("error"),
        traceback=d.get("traceback"),
        history=d.get("history", []),
        updated_at=float(d["updated_at"]),
    )


def create_table(settings: AwsSettings) -> None:
    """Create the ledger's table (on-demand, encrypted) and wait until it is active."""
    ddb = _client(settings)
    attrs = ["pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk"]

    def index(name: str, pk: str, sk: str, include: list[str]) -> Item:
        return {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": pk, "KeyType": "HASH"},
                {"AttributeName": sk, "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": include},
        }

    ddb.create_table(
        TableName=settings.table,
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in attrs],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        GlobalSecondaryIndexes=[
            index("gsi1", "gsi1pk", "gsi1sk", ["state"]),
            index("gsi2", "gsi2pk", "gsi2sk", ["state", "spawned_by", "attempt", "attempt_floor"]),
        ],
        BillingMode="PAY_PER_REQUEST",
        SSESpecification={"Enabled": True},
    )
    ddb.get_waiter("table_exists").wait(TableName=settings.table)


def _client(settings: AwsSettings) -> Any:
    # The shared client: botocore's standard retry mode (throttling and transient
    # errors retried with back-off), one per process and settings.
    return client("dynamodb", settings)


class DynamoTable:
    """The ledger's table and the low-level calls its steps are made of."""

    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self.table = settings.table
        self.client: Any = _client(settings)

    # -- low-level helpers -------------------------------------------------------

    def _get(self, key: Item, projection: Collection[str] | None = None) -> Item | None:
        params: Item = {"TableName": self.table, "Key": key, "ConsistentRead": True}
        if projection:
            names = {f"#p{i}": a for i, a in enumerate(projection)}
            params["ProjectionExpression"] = ", ".join(names)
            params["ExpressionAttributeNames"] = names
        item: Item | None = self.client.get_item(**params).get("Item")
        return item

    def _batch_get(self, keys: Sequence[Item], projection: Collection[str]) -> dict[str, Item]:
        """Strongly consistent reads of ``keys`` (100 per call), by sort key."""
        names = {f"#p{i}": a for i, a in enumerate({"sk", *projection})}
        found: dict[str, Item] = {}
        for start in range(0, len(keys), 100):
            request: Item = {
                self.table: {
                    "Keys": list(keys[start : start + 100]),
                    "ConsistentRead": True,
                    "ProjectionExpression": ", ".join(names),
                    "ExpressionAttributeNames": names,
                }
            }
            delay = 0.05
            while request:
                reply = self.client.batch_get_item(RequestItems=request)
                for item in reply["Responses"].get(self.table, []):
                    found[item["sk"]["S"]] = item
                request = reply.get("UnprocessedKeys") or {}
                if request:  # throttled: back off before asking for the rest
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
        return found

    def _query(self, **params: Any) -> Iterator[Item]:
        params["TableName"] = self.table
        while True:
            reply = self.client.query(**params)
            yield from reply.get("Items", [])
            if "LastEvaluatedKey" not in reply:
                return
            params["ExclusiveStartKey"] = reply["LastEvaluatedKey"]

    def _transact(self, items: Sequence[Item], token: str | None = None) -> list[str] | None:
        """Run one transaction: None if it committed, else each item's
        cancellation code (``ConditionalCheckFailed``, ``TransactionConflict``,
        ``None`` for items that were fine). ``token``: its idempotency token
        (``ClientRequestToken``), for a caller that retries a call whose
        answer may have been lost."""
        assert 0 < len(items) <= MAX_TRANSACTION_ITEMS
        extra = {"ClientRequestToken": token} if token is not None else {}
        try:
            self.client.transact_write_items(TransactItems=list(items), **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            reasons = exc.response.get("CancellationReasons") or []
            return [str(r.get("Code", "None")) for r in reasons] or ["Unknown"] * len(items)
        return None

    def _update(self, e: _Expr, key: Item, **extra: Any) -> Item | None:
        """A conditional ``UpdateItem``: its attributes (per ``ReturnValues``),
        or None if the condition failed."""
        try:
            reply = self.client.update_item(**e.update(self.table, key), **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return None
            raise
        attrs: Item = reply.get("Attributes", {})
        return attrs

    def _batch_get_full(self, keys: Sequence[Item]) -> list[Item]:
        """Whole items for ``keys`` (strongly consistent)."""
        items: list[Item] = []
        for start in range(0, len(keys), 100):
            request: Item = {
                self.table: {"Keys": list(keys[start : start + 100]), "ConsistentRead": True}
            }
            delay = 0.05
            while request:
                reply = self.client.batch_get_item(RequestItems=request)
                items.extend(reply["Responses"].get(self.table, []))
                request = reply.get("UnprocessedKeys") or {}
                if request:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
        return items


def _sum_stats(update: Item, stats: Mapping[str, int]) -> None:
    """Add ``SET stats.#k = if_not_exists(stats.#k, 0) + :v`` clauses to a run
    update: DynamoDB's ADD works on top-level attributes only."""
    names, values = update["ExpressionAttributeNames"], update["ExpressionAttributeValues"]
    names["#stats"] = "stats"
    values[":zero"] = _av(0)
    clauses = []
    for i, (name, value) in enumerate(stats.items()):
        names[f"#k{i}"], values[f":k{i}"] = name, _av(int(value))
        path = f"#stats.#k{i}"
        clauses.append(f"{path} = if_not_exists({path}, :zero) + :k{i}")
    # The run's entry always has a SET clause first (updated_at).
    update["UpdateExpression"] = update["UpdateExpression"].replace(
        "SET ", "SET " + ", ".join(clauses) + ", ", 1
    )


def _filter_states(params: dict[str, Any], states: Collection[RunState | TaskState]) -> None:
    """Add ``state IN (...)`` to a Query's parameters."""
    wanted = {f":s{i}": {"S": s.value} for i, s in enumerate(states)}
    params["FilterExpression"] = f"#state IN ({', '.join(wanted)})"
    params["ExpressionAttributeNames"] = {"#state": "state"}
    params["ExpressionAttributeValues"].update(wanted)
