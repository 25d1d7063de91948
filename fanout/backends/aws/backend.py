"""The AWS backend assembled from its three seams (:func:`open_aws`)."""

from __future__ import annotations

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.crawlstate import DynamoCrawlState
from fanout.backends.aws.ledger import DynamoLedger
from fanout.backends.aws.queue import SqsQueue
from fanout.backends.aws.store import S3Store
from fanout.backends.base import Backend


def open_aws(settings: AwsSettings | None = None) -> Backend:
    """The three seams on AWS; the resources must exist (see ``create_resources``)."""
    settings = settings or AwsSettings.from_env()
    return Backend(
        "aws",
        queue=SqsQueue(settings),
        store=S3Store(settings),
        ledger=DynamoLedger(settings),
        crawl=DynamoCrawlState(settings),
    )
