"""Remove a stage's resources made by ``fanout aws create`` (no CloudFormation):
the work queue and its dead-letter queue, the ledger table, the events topic,
the schedule group with its schedules, and the store bucket, which must be
empty unless forced (it holds every run's output)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code
from fanout.backends.aws.resources import queue_name
from fanout.errors import UserError

_GONE = frozenset(
    {
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "ResourceNotFoundException",
        "NoSuchBucket",
        "NotFound",
        "NotFoundException",
        "404",
    }
)


def _step(what: str, action: Callable[[], object], done: list[str]) -> None:
    """Run one removal; a resource that is not there is reported, not an error."""
    try:
        action()
    except Exception as exc:
        if error_code(exc) not in _GONE:
            raise
        done.append(f"{what}: not found")
    else:
        done.append(f"{what}: deleted")


def _queue_url(sqs: Any, name: str) -> str:
    return str(sqs.get_queue_url(QueueName=name)["QueueUrl"])


def _empty_bucket(s3: Any, bucket: str, force: bool) -> None:
    listed = s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
    if listed.get("KeyCount", 0) and not force:
        raise UserError(
            f"bucket {bucket} is not empty (it holds the runs' output): keep it,"
            " or pass --force to delete everything in it"
        )
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _delete_group(scheduler: Any, group: str) -> None:
    # Deleting a group deletes its schedules, but asynchronously: delete them first
    # so nothing fires into a queue that is about to go.
    paginator = scheduler.get_paginator("list_schedules")
    for page in paginator.paginate(GroupName=group):
        for schedule in page.get("Schedules", []):
            scheduler.delete_schedule(Name=schedule["Name"], GroupName=group)
    scheduler.delete_schedule_group(Name=group)


def destroy_resources(
    settings: AwsSettings, *, group: str, events_topic: str | None, force: bool = False
) -> list[str]:
    """Delete the resources of ``settings``; returns one line per resource. The
    bucket goes first, so a refusal (not empty) leaves everything else in place."""
    done: list[str] = []
    s3 = client("s3", settings)

    def bucket() -> None:
        _empty_bucket(s3, settings.bucket, force)
        s3.delete_bucket(Bucket=settings.bucket)

    _step(f"bucket {settings.bucket}", bucket, done)
    sqs = client("sqs", settings)
    name = queue_name(settings)
    for q in (name, f"{name}-dlq"):

        def delete_queue(q: str = q) -> None:
            sqs.delete_queue(QueueUrl=_queue_url(sqs, q))

        _step(f"queue {q}", delete_queue, done)
    dynamodb = client("dynamodb", settings)
    _step(f"table {settings.table}", lambda: dynamodb.delete_table(TableName=settings.table), done)
    if events_topic:
        sns = client("sns", settings)
        # SNS deletes idempotently: a missing topic is no error, so look first.
        arns = {
            t["TopicArn"]
            for page in sns.get_paginator("list_topics").paginate()
            for t in page.get("Topics", [])
        }
        arn = next((a for a in arns if a.rsplit(":", 1)[-1] == events_topic), None)
        if arn is None:
            done.append(f"topic {events_topic}: not found")
        else:
            _step(f"topic {events_topic}", lambda: sns.delete_topic(TopicArn=arn), done)
    scheduler = client("scheduler", settings)
    _step(f"schedule group {group}", lambda: _delete_group(scheduler, group), done)
    return done
