"""The AWS backend: SQS (queue), S3 (store), DynamoDB (ledger), via boto3.

Configured by :class:`AwsSettings` (environment variables ``FANOUT_AWS_*`` and
the standard AWS ones: ``AWS_REGION``, ``AWS_ENDPOINT_URL``, profiles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fanout.backends.base import Backend


@dataclass(frozen=True)
class AwsSettings:
    """Names of the stack's resources (one stage: dev, prod, ...)."""

    queue: str = "fanout-work"  # SQS queue name or URL
    bucket: str = "fanout-store"
    table: str = "fanout-ledger"
    region: str | None = None
    endpoint_url: str | None = None  # a moto server or other emulator
    #: SNS topic (name or ARN) the work queue is subscribed to with raw message
    #: delivery; when set, undelayed messages are dispatched through it (see
    #: ``fanout.backends.aws.queue``). None: straight to SQS.
    topic: str | None = None
    #: SNS topic (name or ARN) that run events are published to (see
    #: ``fanout.events``). None: no events.
    events_topic: str | None = None
    #: The account that must own the store bucket: every S3 call to it passes
    #: ``ExpectedBucketOwner``, so a bucket of the same name in another account
    #: (S3 names are global) is refused instead of read or written. None: not
    #: checked (the stack's function always sets it, ``FANOUT_AWS_BUCKET_OWNER``).
    bucket_owner: str | None = None

    @classmethod
    def from_env(cls, stage: str | None = None) -> AwsSettings:
        """``FANOUT_AWS_QUEUE``/``_BUCKET``/``_TABLE``, or names derived from the stage;
        the optional topics from ``FANOUT_AWS_DISPATCH_TOPIC`` and
        ``FANOUT_AWS_EVENTS_TOPIC`` (unset or empty: not used); the bucket's
        owning account from ``FANOUT_AWS_BUCKET_OWNER``."""
        stage = stage or os.environ.get("FANOUT_STAGE", "dev")
        return cls(
            queue=os.environ.get("FANOUT_AWS_QUEUE", f"fanout-{stage}-work"),
            bucket=os.environ.get("FANOUT_AWS_BUCKET", f"fanout-{stage}-store"),
            table=os.environ.get("FANOUT_AWS_TABLE", f"fanout-{stage}-ledger"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
            # Opt-in, never derived from the stage: a topic that does not exist
            # would fail every send.
            topic=os.environ.get("FANOUT_AWS_DISPATCH_TOPIC") or None,
            events_topic=os.environ.get("FANOUT_AWS_EVENTS_TOPIC") or None,
            bucket_owner=os.environ.get("FANOUT_AWS_BUCKET_OWNER") or None,
        )


def open_aws(settings: AwsSettings | None = None) -> Backend:
    """The three seams on AWS; the resources must exist (see ``create_resources``)."""
    from fanout.backends.aws.crawlstate import DynamoCrawlState
    from fanout.backends.aws.ledger import DynamoLedger
    from fanout.backends.aws.queue import SqsQueue
    from fanout.backends.aws.store import S3Store

    settings = settings or AwsSettings.from_env()
    return Backend(
        "aws",
        queue=SqsQueue(settings),
        store=S3Store(settings),
        ledger=DynamoLedger(settings),
        crawl=DynamoCrawlState(settings),
    )
