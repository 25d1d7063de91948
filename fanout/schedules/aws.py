"""Schedules on AWS: EventBridge Scheduler schedules that send a fire message to
the work queue.

Each fanout schedule is one EventBridge schedule in the group ``fanout-<stage>``
(created on first use). Its target is the work queue, sent to with the stack's
scheduler role (``FANOUT_AWS_SCHEDULE_ROLE``: the stack output
``SchedulerRoleArn``), and its input is a :class:`~fanout.messages.ScheduleFire`
message: the schedule's name, ``<aws.scheduler.scheduled-time>`` (which
EventBridge fills in) and the schedule's definition. The definition lives only
there; whoever receives a fire message reads the schedule back from EventBridge
(``get``) rather than trusting the message's copy.

Claimed ticks (``fanout --backend aws scheduler --at``) are items of the ledger
table under their own partition, ``SCHEDULE#<name>``, which no ledger query or
index ever reads: ``TICK#<epoch>`` per claimed tick, and beside each claim not
yet settled a ``PENDING#<epoch>`` marker, written and removed in the same
transaction as the claim's own change, so finding the unsettled claims reads
those alone, not every tick the schedule ever fired. A new claim forgets
settled claims older than :data:`~fanout.schedules.model.KEEP_TICKS`, all but
the latest one before it, as the local store does.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code
from fanout.errors import UserError
from fanout.messages import ScheduleFire
from fanout.schedules.model import KEEP_TICKS, Schedule, TickClaim
from fanout.schedules.spec import as_utc, parse_spec

#: The environment variable naming the role EventBridge sends with.
ROLE_ENV = "FANOUT_AWS_SCHEDULE_ROLE"
#: What EventBridge replaces with the tick's time in a target's input.
SCHEDULED_TIME_PLACEHOLDER = "<aws.scheduler.scheduled-time>"
#: EventBridge's limit on a target's input.
MAX_INPUT = 8192
_NOT_FOUND = ("ResourceNotFoundException",)
#: Tries of a tick's claim cancelled for a conflict with another claim of it.
_CONFLICT_TRIES = 3
#: Old claims forgotten at most a claim (see ``_forget_old``).
_PRUNE_EACH = 10

log = logging.getLogger("fanout.scheduler")


def group_name(stage: str | None = None) -> str:
    """The schedule group of a stage: ``fanout-<stage>``."""
    return f"fanout-{stage or os.environ.get('FANOUT_STAGE', 'dev')}"


def fire_input(schedule: Schedule) -> str:
    """The target input of ``schedule``: a fire message whose time EventBridge fills in."""
    message = ScheduleFire(
        schedule=schedule.name,
        scheduled_time=datetime(2000, 1, 1, tzinfo=UTC),  # a stand-in, replaced below
        definition=json.loads(schedule.model_dump_json()),
    )
    body = json.loads(message.model_dump_json())
    body["scheduled_time"] = SCHEDULED_TIME_PLACEHOLDER
    return json.dumps(body, separators=(",", ":"))


def ensure_group(scheduler: Any, group: str) -> None:
    """Make the schedule group ``group`` unless it exists. Looked for first:
    moto replaces an existing group (dropping its schedules) where AWS answers
    ConflictException."""
    try:
        scheduler.get_schedule_group(Name=group)
    except Exception as exc:
        if error_code(exc) not in _NOT_FOUND:
            raise
        try:
            scheduler.create_schedule_group(Name=group)
        except Exception as exc2:  # created meanwhile by another process
            if error_code(exc2) != "ConflictException":
                raise


class EventBridgeScheduleStore:
    """A :class:`~fanout.schedules.model.ScheduleStore` on EventBridge Scheduler
    (claims in the ledger table)."""

    def __init__(self, settings: AwsSettings | None = None, *, group: str | None = None) -> None:
        self.settings = settings or AwsSettings.from_env()
        self.group = group or group_name()
        self.scheduler = client("scheduler", self.settings)
        self.dynamodb = client("dynamodb", self.settings)
        self.table = self.settings.table

    # -- the schedules ---------------------------------------------------------------

    def _queue_arn(self) -> str:
        sqs = client("sqs", self.settings)
        queue = self.settings.queue
        url = queue if "://" in queue else sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(attributes["Attributes"]["QueueArn"])

    def _ensure_group(self) -> None:
        ensure_group(self.scheduler, self.group)

    def add(self, schedule: Schedule) -> None:
        """Create the EventBridge schedule; :class:`UserError` if the name is taken,
        the role is not configured or the expression has no EventBridge form."""
        role = os.environ.get(ROLE_ENV)
        if not role:
            raise UserError(
                f"set {ROLE_ENV} to the stack's SchedulerRoleArn output (`fanout deploy` prints it)"
            )
        spec = parse_spec(schedule.expression)
        body = fire_input(schedule)
        if len(body) > MAX_INPUT:
            raise UserError(
                f"schedule {schedule.name}: its params take {len(body)} bytes;"
                f" EventBridge allows {MAX_INPUT} in a schedule's input"
            )
        kwargs: dict[str, object] = {
            "Name": schedule.name,
            "GroupName": self.group,
            "ScheduleExpression": spec.aws_expression(),
            "ScheduleExpressionTimezone": "UTC",
            "FlexibleTimeWindow": {"Mode": "OFF"},
            "State": "ENABLED",
            "Description": f"fanout: {schedule.job}"[:512],
            "Target": {"Arn": self._queue_arn(), "RoleArn": role, "Input": body},
        }
        # EventBridge counts a rate from its StartDate: the first epoch-aligned tick
        # at or after the (inclusive) start, and after now, keeps it on the grid
        # the local scheduler uses, which is the grid a fire message's tick must
        # be on (fanout.schedules.guard). A cron's start in the past is left out
        # (EventBridge refuses one more than 5 minutes ago; cron ticks are
        # absolute anyway).
        now = datetime.now(UTC)
        first = schedule.next_fire(now) if spec.interval else schedule.start
        if first is not None and first > now:
            kwargs["StartDate"] = first
        self._ensure_group()
        try:
            self.scheduler.create_schedule(**kwargs)
        except Exception as exc:
            if error_code(exc) == "ConflictException":
                raise UserError(
                    f"schedule {schedule.name!r} exists (`fanout schedule remove"
                    f" {schedule.name}` first)"
                ) from None
            raise

    def get(self, name: str) -> Schedule | None:
        """The schedule, read back from its target's input; None if there is none."""
        try:
            found = self.scheduler.get_schedule(Name=name, GroupName=self.group)
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                return None
            raise
        body = json.loads(found["Target"]["Input"])
        return Schedule.model_validate(body["definition"])

    def list(self) -> list[Schedule]:
        """Every schedule of the group, by name."""
        names: list[str] = []
        try:
            for page in self.scheduler.get_paginator("list_schedules").paginate(
                GroupName=self.group
            ):
                names.extend(s["Name"] for s in page.get("Schedules", ()))
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                return []
            raise
        found = (self.get(name) for name in sorted(names))
        return [s for s in found if s is not None]

    def remove(self, name: str) -> bool:
        """Delete the EventBridge schedule and its claimed ticks; whether it existed."""
        try:
            self.scheduler.delete_schedule(Name=name, GroupName=self.group)
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                return False
            raise
        for prefix in ("TICK#", "PENDING#"):
            for sk in self._keys(name, prefix):
                self.dynamodb.delete_item(TableName=self.table, Key=self._key(name, sk))
        return True

    def _keys(self, name: str, prefix: str) -> builtins.list[str]:
        kwargs: dict[str, object] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": {"S": _pk(name)}, ":prefix": {"S": prefix}},
            "ProjectionExpression": "sk",
            "ConsistentRead": True,
        }
        return [item["sk"]["S"] for item in self._query(kwargs)]

    def _query(self, kwargs: dict[str, object], limit: int | None = None) -> Iterator[Any]:
        """The items of a query, page after page (at most ``limit`` pages' worth
        once ``limit`` items were found)."""
        found = 0
        while True:
            page = self.dynamodb.query(**kwargs)
            items = page.get("Items", ())
            yield from items
            found += len(items)
            if (limit is not None and found >= limit) or "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # -- claims -------------------------------------------------------------------

    def claim_tick(self, name: str, tick: datetime) -> bool:
        """The tick's item and its pending marker, one transaction conditional on
        the item not existing: True for exactly one caller."""
        claimed_at = {"N": repr(datetime.now(UTC).timestamp())}
        claim = {"pk": {"S": _pk(name)}, "sk": {"S": _sk(tick)}, "claimed_at": claimed_at}
        pending = {"pk": {"S": _pk(name)}, "sk": {"S": _pending(tick)}, "claimed_at": claimed_at}
        items = [
            {
                "Put": {
                    "TableName": self.table,
                    "Item": claim,
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
            {"Put": {"TableName": self.table, "Item": pending}},
        ]
        for attempt in range(_CONFLICT_TRIES):
            try:
                self.dynamodb.transact_write_items(TransactItems=items)
                break
            except Exception as exc:
                if _cancelled_for(exc, "ConditionalCheckFailed"):
                    return False
                # Two claims of one tick at once (a duplicate delivery beside
                # `scheduler --at`) may both be cancelled for the conflict: the
                # claim may exist by now, else try again.
                if not _cancelled_for(exc, "TransactionConflict") or attempt + 1 == _CONFLICT_TRIES:
                    raise
                if self.tick_claim(name, tick) is not None:
                    return False
        try:
            self._forget_old(name, tick)
        except Exception as exc:  # the claim stands; the next one prunes
            log.warning("schedule %s: old tick claims not pruned: %s", name, exc)
        return True

    def _forget_old(self, name: str, tick: datetime) -> None:
        """Forget (claim and marker) up to :data:`_PRUNE_EACH` of the claims older
        than KEEP_TICKS and older than ``tick``, oldest first, never the latest of
        them: the next pass counts missed ticks from it, also when the claim of
        ``tick`` is released. A few a claim: a schedule that fired for years
        before pruning existed sheds its history over its next claims, not in
        one handler."""
        horizon = min(as_utc(tick), datetime.now(UTC) - KEEP_TICKS) - timedelta(seconds=1)
        kept = self._ticks(name, newest_first=True, limit=1, upto=horizon)
        if not kept:
            return
        before = _tick_of(kept[0]) - timedelta(seconds=1)
        for sk in self._ticks(name, newest_first=False, limit=_PRUNE_EACH, upto=before)[
            :_PRUNE_EACH
        ]:
            old = _tick_of(sk)
            for key in (_pending(old), _sk(old)):  # the marker first: never one without its claim
                self.dynamodb.delete_item(TableName=self.table, Key=self._key(name, key))

    def _key(self, name: str, sk: str) -> dict[str, Any]:
        return {"pk": {"S": _pk(name)}, "sk": {"S": sk}}

    def release_tick(self, name: str, tick: datetime) -> None:
        """Delete the tick's item and its marker, so a later pass claims and fires it again."""
        self.dynamodb.transact_write_items(
            TransactItems=[
                {"Delete": {"TableName": self.table, "Key": self._key(name, sk)}}
                for sk in (_sk(tick), _pending(tick))
            ]
        )

    def settle_tick(self, name: str, tick: datetime) -> None:
        """Mark the claimed ``tick`` as dealt with and drop its marker (only if its
        claim is there; a marker whose claim is gone goes anyway)."""
        try:
            self.dynamodb.transact_write_items(
                TransactItems=[
                    {
                        "Update": {
                            "TableName": self.table,
                            "Key": self._key(name, _sk(tick)),
                            "UpdateExpression": "SET settled = :yes",
                            "ConditionExpression": "attribute_exists(pk)",
                            "ExpressionAttributeValues": {":yes": {"BOOL": True}},
                        }
                    },
                    {"Delete": {"TableName": self.table, "Key": self._key(name, _pending(tick))}},
                ]
            )
        except Exception as exc:
            if not _cancelled_for(exc, "ConditionalCheckFailed"):
                raise
            # No claim (released, or forgotten): a marker left behind would have
            # the tick fired again and again, and skip every later tick under
            # `overlap skip`.
            self.dynamodb.delete_item(TableName=self.table, Key=self._key(name, _pending(tick)))

    def unsettled_ticks(self, name: str, claimed_before: datetime) -> builtins.list[datetime]:
        """Claimed, never settled, claimed before ``claimed_before``; oldest first.
        Reads the pending markers only."""
        kwargs: dict[str, object] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :pending)",
            "FilterExpression": "claimed_at < :before",
            "ExpressionAttributeValues": {
                ":pk": {"S": _pk(name)},
                ":pending": {"S": "PENDING#"},
                ":before": {"N": repr(as_utc(claimed_before).timestamp())},
            },
            "ConsistentRead": True,
        }
        return sorted(
            datetime.fromtimestamp(int(item["sk"]["S"].removeprefix("PENDING#")), UTC)
            for item in self._query(kwargs)
        )

    def tick_claim(self, name: str, tick: datetime) -> TickClaim | None:
        """The claim of ``tick`` (a consistent read), or None if unclaimed."""
        item = self.dynamodb.get_item(
            TableName=self.table, Key=self._key(name, _sk(tick)), ConsistentRead=True
        ).get("Item")
        if item is None:
            return None
        claimed_at = datetime.fromtimestamp(float(item["claimed_at"]["N"]), UTC)
        return TickClaim(claimed_at, bool(item.get("settled", {}).get("BOOL", False)))

    def last_tick(self, name: str, at_or_before: datetime | None = None) -> datetime | None:
        """The latest claimed tick (at or before ``at_or_before``), or None."""
        for sk in self._ticks(name, newest_first=True, limit=1, upto=at_or_before):
            return datetime.fromtimestamp(int(sk.removeprefix("TICK#")), UTC)
        return None

    def _ticks(
        self,
        name: str,
        *,
        newest_first: bool,
        limit: int | None,
        upto: datetime | None = None,
    ) -> builtins.list[str]:
        # Sort keys are fixed-width, so their string order is the time order.
        high = _sk(upto) if upto is not None else "TICK#~"
        kwargs: dict[str, object] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": {
                ":pk": {"S": _pk(name)},
                ":lo": {"S": "TICK#"},
                ":hi": {"S": high},
            },
            "ScanIndexForward": not newest_first,
            "ConsistentRead": True,
        }
        if limit is not None:
            kwargs["Limit"] = limit
        return [item["sk"]["S"] for item in self._query(kwargs, limit)]

    def close(self) -> None:
        """Nothing to release: the boto3 clients are shared by the process."""


def _pk(name: str) -> str:
    return f"SCHEDULE#{name}"


def _sk(tick: datetime) -> str:
    return f"TICK#{int(as_utc(tick).timestamp()):012d}"


def _pending(tick: datetime) -> str:
    return f"PENDING#{int(as_utc(tick).timestamp()):012d}"


def _tick_of(sk: str) -> datetime:
    return datetime.fromtimestamp(int(sk.split("#", 1)[1]), UTC)


def _cancelled_for(exc: Exception, reason: str) -> bool:
    """Whether ``exc`` is a transaction cancelled for ``reason`` (DynamoDB's
    per-item ``CancellationReasons`` code), or for a condition, a single write
    refused for its condition."""
    code = error_code(exc)
    if code == "ConditionalCheckFailedException":
        return reason == "ConditionalCheckFailed"
    if code != "TransactionCanceledException":
        return False
    reasons = (getattr(exc, "response", None) or {}).get("CancellationReasons") or []
    return any(r.get("Code") == reason for r in reasons)
