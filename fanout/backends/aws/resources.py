"""Create the AWS backend's resources: the SQS queue (and its dead-letter queue),
the S3 bucket and the DynamoDB table.

For tests (under moto) and for ``fanout deploy``; idempotent, so running it on
an existing stack is harmless. Production stacks may come from a template
instead; this creates the same shape:

- queue: SQS-managed encryption, 14 days retention, a redrive policy moving a
  message that was received 50 times to ``<queue>-dlq`` (the engine's ledger
  remains the record of every task; the DLQ only keeps poison messages from
  circling forever);
- bucket: all public access blocked, default encryption (SSE-S3), incomplete
  multipart uploads aborted after a day;
- table: created by ``fanout.backends.aws.ledger.create_table`` when that exists;
- dispatch topic (only when ``AwsSettings.topic`` is set): an SNS topic with the
  work queue subscribed with raw message delivery, and a queue policy letting
  that topic (and only it) send to the queue;
- events topic (only when ``AwsSettings.events_topic`` is set): an SNS topic;
  who subscribes to it is up to its consumers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code

log = logging.getLogger(__name__)

#: Receives after which SQS moves a message to the dead-letter queue.
MAX_RECEIVE_COUNT = 50
RETENTION_SECONDS = 14 * 24 * 3600  # SQS's maximum
DEFAULT_VISIBILITY = 30


def queue_name(settings: AwsSettings) -> str:
    """The queue's name (``settings.queue`` may be a URL)."""
    return settings.queue.rstrip("/").rsplit("/", 1)[-1]


def create_queue(settings: AwsSettings) -> str:
    """Create the work queue and its dead-letter queue; returns the queue URL."""
    sqs = client("sqs", settings)
    name = queue_name(settings)
    encrypted = {"SqsManagedSseEnabled": "true"}
    dlq_url = sqs.create_queue(
        QueueName=f"{name}-dlq",
        Attributes={**encrypted, "MessageRetentionPeriod": str(RETENTION_SECONDS)},
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT})
    attributes = {
        **encrypted,
        "MessageRetentionPeriod": str(RETENTION_SECONDS),
        "VisibilityTimeout": str(DEFAULT_VISIBILITY),
        "RedrivePolicy": redrive,
    }
    try:
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    except Exception as exc:
        if error_code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
            raise
        # It exists with other attributes: bring them to ours.
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return str(url)


def make_private_bucket(
    s3: Any, bucket: str, region: str | None, *, owner: str | None = None, tls_only: bool = False
) -> None:
    """Create ``bucket`` (an existing one of ours is fine), block all public
    access and encrypt it by default: every bucket fanout makes is private.
    ``owner``: the account that must own it, passed as ``ExpectedBucketOwner`` to
    each call after the creation. ``tls_only``: a bucket policy denies requests
    without TLS (the code bucket; the stack's store bucket has it from the
    template, and a test's may be served over plain HTTP by a local emulator)."""
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":  # us-east-1 rejects an explicit constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except Exception as exc:
        if error_code(exc) != "BucketAlreadyOwnedByYou":
            raise
    expected = {"ExpectedBucketOwner": owner} if owner else {}
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
        **expected,
    )
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
        **expected,
    )
    if tls_only:
        policy = json.dumps(tls_only_policy(bucket))
        s3.put_bucket_policy(Bucket=bucket, Policy=policy, **expected)


def tls_only_policy(bucket: str, partition: str = "aws") -> dict[str, Any]:
    """A bucket policy denying every request made without TLS (Security Hub S3.5);
    the same statement as the template's ``StoreBucketPolicy``."""
    arn = f"arn:{partition}:s3:::{bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [arn, f"{arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }


def create_bucket(settings: AwsSettings) -> str:
    """Create the store bucket: private, encrypted by default; returns its name."""
    s3 = client("s3", settings)
    bucket = settings.bucket
    make_private_bucket(
        s3, bucket, settings.region or s3.meta.region_name, owner=settings.bucket_owner
    )
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "abort-incomplete-uploads",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
        **({"ExpectedBucketOwner": settings.bucket_owner} if settings.bucket_owner else {}),
    )
    return bucket


def create_table(settings: AwsSettings) -> bool:
    """Create the ledger's table if the ledger module offers ``create_table``
    and the table does not exist yet; returns whether it did."""
    try:
        from fanout.backends.aws import ledger

        create = ledger.create_table  # type: ignore[attr-defined,unused-ignore]
    except (ImportError, AttributeError):
        log.warning("fanout.backends.aws.ledger.create_table is not available: no table created")
        return False
    try:
        create(settings)
    except Exception as exc:
        if error_code(exc) != "ResourceInUseException":
            raise
        return False  # it exists: idempotent, like the queue and the bucket
    return True


def _topic_name(topic: str) -> str:
    """A topic's name from its name or ARN."""
    return topic.rsplit(":", 1)[-1]


def create_topic(settings: AwsSettings, topic: str) -> str:
    """Create an SNS topic (idempotent); returns its ARN."""
    sns = client("sns", settings)
    return str(sns.create_topic(Name=_topic_name(topic))["TopicArn"])


def create_dispatch(settings: AwsSettings, queue_url: str) -> str | None:
    """Create the dispatch topic and subscribe the work queue to it with raw
    message delivery (idempotent); returns the topic ARN, or None when
    ``settings.topic`` is not set."""
    if not settings.topic:
        return None
    arn = create_topic(settings, settings.topic)
    sqs = client("sqs", settings)
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    # SNS delivers to SQS as the SNS service principal: without this statement
    # the subscription exists but every delivery is silently refused. Scoped to
    # this topic, so no other topic can write to the work queue.
    sid = f"fanout-dispatch-{arn.rsplit(':', 1)[-1]}"
    statement = {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": arn}},
    }
    # Added to the queue's policy, not put in its place: the statements already
    # there (another topic's, a TLS-only deny) stay.
    current = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["Policy"])
    policy = json.loads(current.get("Attributes", {}).get("Policy") or "{}")
    kept = [st for st in policy.get("Statement", []) if st.get("Sid") != sid]
    policy = {"Version": "2012-10-17", **policy, "Statement": [*kept, statement]}
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})
    sns = client("sns", settings)
    # SNS returns the existing subscription for the same topic, protocol,
    # endpoint and attributes, so a re-run does not subscribe twice. Raw
    # delivery: the queue gets the body itself, not SNS's JSON envelope.
    sns.subscribe(
        TopicArn=arn,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true"},
        ReturnSubscriptionArn=True,
    )
    return arn


def create_resources(settings: AwsSettings) -> dict[str, object]:
    """Create the queue, bucket and table of ``settings``, and the topics when
    set (idempotent); returns what it made: ``{"queue_url": ..., "bucket": ...,
    "table": bool}``, plus ``"topic"`` and ``"events_topic"`` ARNs when set."""
    queue_url = create_queue(settings)
    made: dict[str, object] = {
        "queue_url": queue_url,
        "bucket": create_bucket(settings),
        "table": create_table(settings),
    }
    if settings.topic:
        made["topic"] = create_dispatch(settings, queue_url)
    if settings.events_topic:
        made["events_topic"] = create_topic(settings, settings.events_topic)
    return made
