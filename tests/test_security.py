"""Security properties of the AWS path (issue 15): the store only talks to a
bucket of the expected account, and on Lambda a job ref resolves only inside
the deployed package."""

from __future__ import annotations

import io
from typing import Any

import boto3
import pytest

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.store import SINGLE_PUT_BYTES, S3Store
from fanout.backends.base import Backend

OWNER = "123456789012"


def test_every_store_call_to_the_bucket_names_its_owner(aws: Backend) -> None:
    settings = AwsSettings.from_env()
    s3 = boto3.client("s3")
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls.append((model.name, dict(params)))

    s3.meta.events.register("provide-client-params.s3", record)
    store = S3Store(AwsSettings(**{**settings.__dict__, "bucket_owner": OWNER}), s3=s3)
    big = b"x" * (SINGLE_PUT_BYTES + 1)
    store.put("a/small", b"1")
    assert store.put("a/small", b"2", if_absent=True) is False
    store.put("a/big", io.BytesIO(big))  # s3transfer's multipart upload
    store.put("a/big-once", io.BytesIO(big), if_absent=True)  # our own multipart upload
    assert store.get("a/small") == b"1" and store.exists("a/big")
    assert list(store.list("a/")) == ["a/big", "a/big-once", "a/small"]
    store.delete("a/small")
    ops = {name for name, _ in calls}
    assert {"PutObject", "GetObject", "HeadObject", "ListObjectsV2", "DeleteObject"} <= ops
    assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= ops
    missing = [name for name, params in calls if params.get("ExpectedBucketOwner") != OWNER]
    assert missing == []
