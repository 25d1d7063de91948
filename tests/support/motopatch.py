"""Patches to moto for the tests (idempotent): same behaviour, cheaper.

- SQS reads the clock through ``datetime`` arithmetic for every message it
  scans and scans the whole queue per message (its retention check recomputes
  every queue attribute): quadratic and slow. It is also not thread-safe: two
  concurrent deletes each rebuild the message list from the same old one, and
  one deletion is lost. One lock around the calls that change the list.
- DynamoDB's ``TransactWriteItems`` deep-copies the whole table once per item
  of the transaction, so that it can roll back: a 100-item transaction on a
  table of a few thousand items takes seconds. Here it keeps an undo log of
  just the items the transaction writes instead, and rolls back from that,
  under a lock that every DynamoDB write takes.
- S3 evaluates a bucket policy's statements without their conditions, so the
  usual ``Deny`` of requests without TLS (``aws:SecureTransport`` false) denies
  everything. In-process moto is reached over ``https://`` URLs, so such a
  statement does not apply to its requests: it is left out of the evaluation.
  Its conditional put (``If-None-Match: *``, on ``PutObject`` and on completing
  a multipart upload) checks for the key, then writes it: two threads can both
  pass the check. Real S3 decides atomically; here one lock covers both steps.

One patch adds a check moto lacks, so that tests see what AWS would answer:
DynamoDB refuses an update or condition expression over 4 KB
(``ValidationException``), on ``UpdateItem`` and in ``TransactWriteItems``.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from typing import Any


def patch_moto() -> None:
    """Apply the patches (once per process)."""
    _patch_sqs()
    _patch_dynamodb()
    _patch_s3_policy()
    _patch_s3_conditional_put()


def _patch_s3_conditional_put() -> None:
    import moto.s3.responses as s3_responses

    response_class: Any = s3_responses.S3Response
    if getattr(response_class, "_fanout_put_locked", False):
        return
    lock = threading.RLock()
    response_class.put_object = _locked(lock, response_class.put_object)
    response_class._key_response_post = _locked(lock, response_class._key_response_post)
    response_class._fanout_put_locked = True


def _patch_s3_policy() -> None:
    import json

    import moto.s3.models as s3_models

    bucket_class: Any = s3_models.FakeBucket
    if getattr(bucket_class, "_fanout_patched", False):
        return
    original = bucket_class.get_permission

    def tls_deny(statement: dict[str, Any]) -> bool:
        condition = statement.get("Condition") or {}
        return statement.get("Effect") == "Deny" and condition == {
            "Bool": {"aws:SecureTransport": "false"}
        }

    def get_permission(self: Any, action: str, resource: str) -> Any:
        policy = self.policy
        if policy is None:
            return original(self, action, resource)
        document = json.loads(policy)
        kept = [s for s in document.get("Statement", []) if not tls_deny(s)]
        try:
            self.policy = json.dumps({**document, "Statement": kept}).encode() if kept else None
            return original(self, action, resource)
        finally:
            self.policy = policy

    bucket_class.get_permission = get_permission
    bucket_class._fanout_patched = True


def _locked(lock: threading.RLock, method: Any) -> Any:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return locked


def _patch_sqs() -> None:
    import moto.sqs.models as sqs_models

    if getattr(sqs_models, "_fanout_patched", False):
        return

    def unix_time(dt: Any = None) -> float:
        return time.time() if dt is None else float(original(dt))

    def retained(self: Any, queue_name: str, message: Any) -> bool:
        queue = self.get_queue(queue_name)
        sent: float = message.sent_timestamp / 1000
        return int(queue.message_retention_period) + sent > time.time()

    original = getattr(sqs_models, "unix_time")  # noqa: B009 (not exported: no stub)
    setattr(sqs_models, "unix_time", unix_time)  # noqa: B010
    setattr(sqs_models, "unix_time_millis", lambda dt=None: unix_time(dt) * 1000.0)  # noqa: B010
    setattr(sqs_models.SQSBackend, "is_message_valid_based_on_retention_period", retained)  # noqa: B010
    lock = threading.RLock()
    for cls, name in (
        (sqs_models.SQSBackend, "receive_message"),
        (sqs_models.SQSBackend, "delete_message"),
        (sqs_models.SQSBackend, "change_message_visibility"),
        (sqs_models.SQSBackend, "send_message"),
    ):
        setattr(cls, name, _locked(lock, getattr(cls, name)))
    setattr(sqs_models, "_fanout_patched", True)  # noqa: B010


class _CopyShim:
    """``copy`` for moto's DynamoDB models: a table is not deep-copied while a
    transaction keeps its own undo log (see ``_patch_dynamodb``)."""

    active = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    def deepcopy(self, obj: Any, memo: Any = None) -> Any:
        from moto.dynamodb.models.table import Table

        if isinstance(obj, Table) and getattr(self.active, "on", False):
            return obj
        return copy.deepcopy(obj, memo)


def _patch_dynamodb() -> None:
    import moto.dynamodb.models as ddb_models

    if getattr(ddb_models, "_fanout_patched", False):
        return
    shim = _CopyShim()
    setattr(ddb_models, "copy", shim)  # noqa: B010
    original = ddb_models.DynamoDBBackend.transact_write_items
    # The undo log restores items as they were: no other write may land in
    # between (the Lambda watchdog writes from a second thread), so every
    # write takes the same lock.
    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "batch_write_item"):
        if hasattr(ddb_models.DynamoDBBackend, name):
            setattr(
                ddb_models.DynamoDBBackend,
                name,
                _locked(lock, getattr(ddb_models.DynamoDBBackend, name)),
            )

    update_item = ddb_models.DynamoDBBackend.update_item

    @functools.wraps(update_item)
    def checked_update_item(
        self: Any, table_name: str, key: Any, update_expression: str, *args: Any, **kwargs: Any
    ) -> Any:
        _check_expression("UpdateExpression", update_expression)
        _check_expression("ConditionExpression", kwargs.get("condition_expression"))
        return update_item(self, table_name, key, update_expression, *args, **kwargs)

    setattr(ddb_models.DynamoDBBackend, "update_item", checked_update_item)  # noqa: B010

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        for item in transact_items:
            for op in item.values():
                for field in ("UpdateExpression", "ConditionExpression"):
                    _check_expression(field, op.get(field))
        with lock:
            undo: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
            try:
                for item in transact_items:
                    op_type, op = next(iter(item.items()))
                    name = op.get("TableName")
                    if op_type == "ConditionCheck" or name not in self.tables:
                        continue  # writes nothing: nothing to undo
                    table = self.tables[name]
                    if op_type == "Put":
                        names = [table.hash_key_attr, table.range_key_attr]
                        key = {k: op["Item"][k] for k in names if k}
                    else:
                        key = op["Key"]
                    current = self.get_item(name, key)
                    old = copy.deepcopy(current.to_json()["Attributes"]) if current else None
                    undo.append((name, key, old))
            except Exception:
                return original(self, transact_items)  # odd input: moto's own way
            shim.active.on = True
            try:
                return original(self, transact_items)
            except Exception:
                for name, key, old in reversed(undo):
                    if old is not None:
                        self.put_item(name, old)
                    elif self.get_item(name, key) is not None:
                        self.delete_item(name, key)
                raise
            finally:
                shim.active.on = False

    setattr(ddb_models.DynamoDBBackend, "transact_write_items", transact_write_items)  # noqa: B010
    setattr(ddb_models, "_fanout_patched", True)  # noqa: B010


#: DynamoDB's limit on the length of any expression string (bytes).
MAX_EXPRESSION_BYTES = 4096


def _check_expression(field: str, expression: str | None) -> None:
    """Refuse an expression over :data:`MAX_EXPRESSION_BYTES`, in DynamoDB's words."""
    from moto.dynamodb.exceptions import MockValidationException

    size = len(expression.encode()) if expression else 0
    if size > MAX_EXPRESSION_BYTES:
        raise MockValidationException(
            f"Invalid {field}: Expression size has exceeded the maximum allowed size;"
            f" expression size: {size}"
        )
